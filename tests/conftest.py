"""What the tests share: running a script (in this interpreter, or as a new process where the
process itself is under test), the tiny flag sets, the checks every bad-input test makes, and the
trained runs several tests read (session-scoped: each is trained once per test session)."""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The cores shared out between the workers (pytest.ini), here and in the processes the tests
    # start: two workers of two threads each on two cores ran the suite 2.5x slower than one.
    THREADS = max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each trains the shared runs it needs again), and
    no more than the files named, where only files are (a worker takes whole files); one file runs
    in this process (0), where a worker would only add its start-up."""
    files = {arg.split("::")[0] for arg in config.args}
    named = len(files) if files and all(f.endswith(".py") for f in files) else CORES
    return 0 if named == 1 else min(4, CORES, named)


ORIGINAL_CONFIGURATION = ["--codebook", "loss", "--codebook-init", "uniform", "--dead-code-threshold",
                      "0", "--lr-schedule", "constant", "--conv-init-scale", "1",
                      "--latent-init-scale", "1"]


# The shared tiny run (`trained_run`) and the runs compared with it use a constant rate: a cosine
# schedule spans the epochs a run was started with, so only a constant-rate run can be resumed for
# more epochs (test_resume_after_an_epoch_is_bit_identical); the signal tests resume the default
# cosine schedule mid-run.
CONSTANT_LR = ["--lr-schedule", "constant"]


TINY = ["--hidden-size", "16", "--k", "32", "--batch-size", "64", "--train-subset", "1024",
        "--test-subset", "256", "--num-workers", "0", "--seed", "3"]


def run(script, *args, cwd, check=True):
    """Run one of the repo's scripts in folder `cwd` -> (returncode, stdout, stderr): its entry
    point in this interpreter (no 2-4 s start-up per call). What only a process shows (its exit on
    a signal, torchrun) the tests run with subprocess themselves."""
    result = run_in_process(script, [str(a) for a in args], cwd)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


_scripts = {}


def load_script(script):
    """A top-level script as a module (VQ-VAE.py's name is not importable as is), loaded once."""
    if script not in _scripts:
        spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"),
                                                      os.path.join(REPO, script))
        _scripts[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_scripts[script])
    return _scripts[script]


def run_in_process(script, args, cwd):
    """The script's `main` with sys.argv, the working folder and stdout/stderr swapped for the
    call; SystemExit becomes the return code, as a process's exit status would."""
    module, here, argv = load_script(script), os.getcwd(), sys.argv
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = [script, *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            module.main(*module.parse_args()) if hasattr(module, "parse_args") else module.main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        os.chdir(here)
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    from data import prepare_mnist
    prepare_mnist(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_folder):
    """One tiny end-to-end VQ-VAE.py run (2 epochs), shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("run")
    result = run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder,
                 "--num-epochs", "2", *TINY, *CONSTANT_LR, cwd=cwd)
    return cwd, result


PRETRAINED_VQVAE = os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt")


def assert_clean_failure(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def run_files(folder):
    """The files a run wrote to `folder`, without its claim (.run.lock): sorted names."""
    return sorted(name for name in os.listdir(folder) if name != ".run.lock")


def assert_same_weights(path_a, path_b):
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    assert a["step"] == b["step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, data_folder):
    """A 2-epoch run of 32 steps at the default cosine rate: the reference for interrupted and
    resumed runs."""
    cwd = tmp_path_factory.mktemp("whole")
    run("VQ-VAE.py", "--output-folder", "whole", *signal_run_flags(data_folder), cwd=cwd)
    return cwd / "models" / "whole" / "last.pt"


def signal_run_flags(data_folder):
    return ["--data-folder", data_folder, "--num-epochs", "2", *TINY]


def prior_flags(trained_run, data_folder):
    """A tiny prior over the shared VQ-VAE's codes, at a constant rate (resumable for more epochs)."""
    cwd, _ = trained_run
    return ["--vqvae-model", str(cwd / "models" / "tiny" / "best.pt"), "--data-folder",
            data_folder, "--train-subset", "1024", "--hold-out", "256", "--test-subset", "256",
            "--num-layers", "4", "--channels", "32", "--lr-schedule", "constant"]


@pytest.fixture(scope="session")
def trained_prior(trained_run, data_folder):
    """The tiny prior, 2 epochs, in the shared VQ-VAE run's folder (models/prior/)."""
    cwd, _ = trained_run
    result = run("pixelcnn_prior.py", *prior_flags(trained_run, data_folder), "--num-epochs", "2",
                 "--output-folder", "prior", cwd=cwd)
    return cwd, result


def interrupt_then_resume(script, flags, cwd, name, first_line, signum=2):
    """Start `script`, send `signum` once it has printed `first_line`, check the stop, resume."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--output-folder",
                                name, *flags], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith(first_line)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"--resume models/{name}/last.pt" in stderr
    cut = torch.load(cwd / "models" / name / "last.pt", weights_only=True)
    assert cut["metrics"] is None and 0 < cut["batch_in_epoch"]  # stopped mid-epoch
    run(script, "--resume", f"models/{name}/last.pt", *flags[flags.index("--data-folder"):][:2],
        cwd=cwd)
    return cut


CLASSIFIER = ["--train-subset", "2048", "--hold-out", "500", "--test-subset", "500",
              "--num-epochs", "2", "--seed", "1"]


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, data_folder):
    cwd = tmp_path_factory.mktemp("judge")
    result = run("classifier.py", "--output-folder", "judge", "--data-folder", data_folder,
                 *CLASSIFIER, cwd=cwd)
    return cwd, result


def pytest_collection_modifyitems(items):
    """The longest files first, so that under `-n` (pytest.ini) the last to finish are short ones."""
    first = ("test_notebook.py", "test_gpu_and_torchrun.py", "test_runs.py", "test_quantizers.py")
    rank = {name: i for i, name in enumerate(first)}
    items.sort(key=lambda item: rank.get(item.path.name, len(first)))
