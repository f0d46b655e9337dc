"""The repo's documents and layout agree with its code: FLAGS.md's tables with the parsers,
RESULTS.md's guarantees with the tests that check them, section pointers with the sections, and no
script imports another script."""
import ast
import glob
import multiprocessing as mp
import os
import re

import pytest

from conftest import REPO, load_script


def read(name):
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def scripts():
    """The top-level files run as programs (they have a __main__ block) -> module names."""
    return {name[:-3] for name in os.listdir(REPO) if name.endswith(".py")
            and 'if __name__ == "__main__":' in read(name)}


def test_no_script_imports_another_script():
    names = scripts()
    assert {"VQ-VAE", "generate", "pixelcnn_prior", "classifier", "sample_quality"} <= names
    for path in glob.glob(os.path.join(REPO, "*.py")):
        tree = ast.parse(read(os.path.basename(path)))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & names, (os.path.basename(path), imported & names)


def flag_tables():
    """{script file: [(flag, its default as written)]}, from the tables under FLAGS.md's
    '## `NAME.py`' headings; a row may name several flags with their defaults, comma-separated."""
    tables, script = {}, None
    for line in read("FLAGS.md").splitlines():
        heading = re.match(r"#+ `(\S+\.py)`", line)
        if line.startswith("#"):
            script = heading.group(1) if heading else None
            continue
        if not (script and line.startswith("| `--")):
            continue
        flags_cell, defaults_cell = [cell.strip() for cell in line.strip("|").split("|")][:2]
        flags = re.findall(r"`(--[\w-]+)`", flags_cell)
        defaults = re.split(r",\s*", defaults_cell) if defaults_cell else [""] * len(flags)
        assert len(defaults) == len(flags), line
        tables.setdefault(script, []).extend(zip(flags, defaults))
    return tables


def parser_of(script):
    return load_script(script).build_parser()


def same_default(written, default):
    written = written.strip("`")
    if written == "":
        return default in (None, False)  # an empty cell: not set
    if written == "off":
        return default is False
    if written == "cpu_count()-1":
        return default == max(mp.cpu_count() - 1, 0)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(written) == default
    if isinstance(default, list):  # nargs="+": written as typed
        return written == " ".join(map(str, default))
    return written == str(default)


def test_every_default_in_the_flag_tables_is_the_parsers():
    tables = flag_tables()
    assert {"VQ-VAE.py", "pixelcnn_prior.py", "classifier.py", "generate.py"} <= tables.keys()
    for script, rows in tables.items():
        actions = {option: action for action in parser_of(script)._actions
                   for option in action.option_strings}
        for flag, written in rows:
            assert flag in actions, (script, flag)
            assert same_default(written, actions[flag].default), \
                (script, flag, written, actions[flag].default)
    # the original's command line is the contract: every flag of VQ-VAE.py is in its table
    documented = {flag for flag, _ in tables["VQ-VAE.py"]}
    options = {action.option_strings[0] for action in parser_of("VQ-VAE.py")._actions
               if action.option_strings[0] != "-h"}
    assert options <= documented, options - documented


def test_every_guarantee_in_results_names_tests_that_exist():
    text = read("RESULTS.md")
    table = text[text.index("What is guaranteed"):]
    table = table[:table.index("\n#")] if "\n#" in table else table
    named = set(re.findall(r"`(test_\w+)`", table))
    defined = set()
    for path in [os.path.join(REPO, "testers.py"), *glob.glob(os.path.join(REPO, "tests", "*.py"))]:
        with open(path) as f:
            defined |= set(re.findall(r"^def (test_\w+)", f.read(), re.M))
    assert len(named) >= 20 and named <= defined, named - defined


@pytest.mark.parametrize("document", ["README.md", "RESULTS.md"])
def test_section_pointers_name_sections_that_exist(document):
    """Every `README "Section"` / `RESULTS.md "Section"` in the code and the documents names a
    heading of that document (by its first words)."""
    headings = [line.lstrip("#").strip() for line in read(document).splitlines()
                if line.startswith("#")]
    stem = document[:-3]
    pattern = re.compile(stem + r'(?:\.md)? "([^"]+)"')
    files = [name for name in os.listdir(REPO) if name.endswith((".py", ".md", ".txt"))]
    pointers = [(name, section) for name in files for section in pattern.findall(read(name))]
    for name, section in pointers:
        assert any(heading.startswith(section) for heading in headings), (name, section)
