"""Checkpoint files: written atomically, read with weights_only=True and checked for who wrote them;
models rebuilt from the config they hold (the VQ-VAE, also from the original repo's bare
state_dicts, the priors, the judges).

A checkpoint holds "model_config" (the network's config dataclass, as a dict), "run_config" (the
command line it was trained with, which --resume needs) and "state_dict". Checkpoints written
before the two were apart hold one "config", the command line: the model is read from its flags.
"""
from dataclasses import fields

import contextlib
import io
import os
import pickle
import sys
import warnings
import zipfile

import torch

from cli import SIZE_FLAGS, fail
from files import atomic_write
from code_transformer import CodeTransformerConfig
from gated_pixelcnn import GatedPixelCNNConfig
from judges import JudgeConfig, judge_from_config
from modules import ORIGINAL_CONFIG, VQVAEConfig, original_config_with, vqvae_from_config
from priors import prior_config, prior_from_config


# The committed checkpoints (model.txt), wherever the script using them is run from
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "pretrained")
CHECKPOINT_KINDS = {"vqvae": "VQ-VAE.py", "prior": "pixelcnn_prior.py", "classifier": "classifier.py"}


def save_checkpoint(path, checkpoint, replace=True):
    """Write atomically (`atomic_write`): a crash or a full disk mid-write leaves the previous file
    at `path` untouched, and a reader never sees half a checkpoint; replace=False never replaces
    a file there (FileExistsError)."""
    with atomic_write(path, replace) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path, kind, flag="--model"):
    """Load a checkpoint with weights_only=True (no pickled code can run) and check who wrote it
    (`kind`: 'vqvae', 'prior' or 'classifier'; None takes any of them); int8 weights come back in
    float32 (`float_weights`).
    Returns the checkpoint dict ({'state_dict': ..., 'config': None} for an original-style bare
    state_dict).
    Every failure is one line naming the flag and file, exit 2, including weights holding NaN or
    infinity (training stops before it would save such weights, so only a damaged file has them)."""
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a folder; expected a checkpoint file")
    if not os.path.isfile(path):
        fail(f"{flag} {path}: no such file")
    if damaged := failed_checksum(path):
        fail(f"{flag} {path}: damaged, {damaged} does not match its checksum (a disk error or a "
             f"bad copy); refused")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: the line below says it
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a reference to a Python callable
            fail(f"{flag} {path}: refused, the file holds pickled Python objects that could run "
                 f"code; only tensors and plain values are loaded (weights_only=True)")
        fail(f"{flag} {path}: not a PyTorch checkpoint, or truncated")
    except Exception:  # torch raises several types for empty, truncated or foreign files
        fail(f"{flag} {path}: not a PyTorch checkpoint, or truncated")
    if not isinstance(checkpoint, dict) or not checkpoint:
        fail(f"{flag} {path}: not a checkpoint dict")
    if "state_dict" not in checkpoint:
        if kind in ("vqvae", None) and all(isinstance(v, torch.Tensor)
                                           for v in checkpoint.values()):
            return {"kind": "vqvae", "state_dict": finite(checkpoint, flag, path), "config": None}
        fail(f"{flag} {path}: not a checkpoint of this repo (no 'state_dict')")
    if not isinstance(checkpoint["state_dict"], dict):
        fail(f"{flag} {path}: its state_dict is not a dict")
    found = checkpoint.get("kind", "vqvae")
    if not isinstance(found, str):
        fail(f"{flag} {path}: its kind {found!r} is not a name; expected one of "
             f"{', '.join(CHECKPOINT_KINDS)}")
    if kind is None and found not in CHECKPOINT_KINDS:
        fail(f"{flag} {path}: a checkpoint of unknown kind {found!r}; expected one written by "
             f"{', '.join(CHECKPOINT_KINDS.values())}")
    if kind is not None and found != kind:
        fail(f"{flag} {path}: this is a {found} checkpoint written by "
             f"{CHECKPOINT_KINDS.get(found, 'another script')}; expected a {kind} checkpoint "
             f"written by {CHECKPOINT_KINDS[kind]}")
    if "int8_scales" in checkpoint:
        checkpoint["state_dict"] = float_weights(checkpoint["state_dict"],
                                                 checkpoint.pop("int8_scales"), flag, path)
    finite(checkpoint["state_dict"], flag, path)
    return checkpoint


def failed_checksum(path):
    """The first record of a checkpoint in torch.save's zip format whose bytes do not match their
    CRC-32, or None: torch.load does not check them, so a flipped byte would load as a wrong weight.
    None too for what torch.load is left to judge: a file that is not a zip, or whose record table
    does not read."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [r for r in archive.infolist() if r.CRC]  # 0: saved without CRCs (torch can)
            for record in records:
                try:
                    with archive.open(record) as f:   # zipfile checks the CRC as it reads
                        while f.read(1 << 20):
                            pass
                except (zipfile.BadZipFile, OSError):
                    return f"record {record.filename}"
    except (zipfile.BadZipFile, OSError):
        return None
    return None


def finite(state_dict, flag, path):
    """state_dict, or one line naming its first floating tensor that holds NaN or infinity: such
    weights would draw a blank grid or score NaN instead of failing."""
    bad = next((name for name, w in state_dict.items() if isinstance(w, torch.Tensor) and
                w.is_floating_point() and not torch.isfinite(w).all()), None)
    if bad is not None:
        fail(f"{flag} {path}: weight {bad} holds NaN or infinite values (a damaged file or a "
             f"diverged run); refused")
    return state_dict


def int8_weights(state_dict):
    """Weights to share at a quarter of float32: each floating tensor of two or more dims as int8
    with one scale per slice of its first dim (a convolution's or linear layer's output channel,
    an embedding's row), max |w| / 127 (symmetric, round to nearest); the other floating tensors
    (biases, norms) in float16 -> (state_dict, scales {name: (len(w),) float32})."""
    packed, scales = half_weights(state_dict), {}
    for name, w in state_dict.items():
        if w.is_floating_point() and w.dim() >= 2:
            scales[name] = w.float().flatten(1).abs().amax(1).clamp_min(1e-12) / 127
            packed[name] = (w.float() / per_channel(scales[name], w)).round().to(torch.int8)
    return packed, scales


def half_weights(state_dict):
    """Floating tensors in float16, the rest (integer counters, bool flags) as they are."""
    return {name: w.half() if w.is_floating_point() else w for name, w in state_dict.items()}


def float_weights(state_dict, scales, flag, path):
    """`int8_weights`' inverse at load: each int8 tensor times its slices' scales -> float32;
    scales that fit no int8 weight are one line naming the file."""
    if not isinstance(scales, dict) or not isinstance(state_dict, dict):
        fail(f"{flag} {path}: its int8_scales or state_dict is not a dict")
    for name, scale in scales.items():
        w = state_dict.get(name)
        problem = "is missing" if not isinstance(w, torch.Tensor) else \
            "is not int8" if w.dtype != torch.int8 or w.dim() < 2 else \
            "has other scales" if not isinstance(scale, torch.Tensor) or \
            scale.shape != (w.size(0),) else None
        if problem:
            fail(f"{flag} {path}: int8 weight {name}, which its int8_scales name, {problem}")
    return {name: w.float() * per_channel(scales[name], w) if name in scales else w
            for name, w in state_dict.items()}


def per_channel(scale, w):
    """(out,) -> (out, 1, ...), broadcasting over the rest of w."""
    return scale.view(-1, *[1] * (w.dim() - 1))


def load_resume_checkpoint(path, kind):
    """`load_checkpoint` for --resume, which also needs the training state: a weights-only file
    (an original-style bare state_dict, a file of export_checkpoint.py) is refused."""
    checkpoint = load_checkpoint(path, kind, "--resume")
    if "optimizer" not in checkpoint:
        fail(f"--resume {path}: weights only, without the optimizer state a resume needs; "
             f"resume from the run's last.pt")
    return checkpoint


def load_state(model, state_dict, flag, path):
    """load_state_dict, or one line naming the first keys that are missing, unexpected or of
    another size (the model is then discarded: `fail` exits)."""
    def first(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    expected = model.state_dict()
    # load_state_dict would cast integers to float: int8 weights without their scales load wrong
    integer = [k for k, v in state_dict.items() if k in expected and
               expected[k].is_floating_point() and isinstance(v, torch.Tensor) and
               not (v.is_floating_point() or v.dtype == torch.bool)]
    problems = [f"{what} {first(keys)}" for what, keys in
                (("missing", [k for k in expected if k not in state_dict]),
                 ("unexpected", [k for k in state_dict if k not in expected]),
                 ("integer (int8 without its scales?) for float", integer)) if keys]
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        resized = [line.split("size mismatch for ")[1].split(":")[0]
                   for line in str(e).splitlines() if "size mismatch for " in line]
        problems.append(f"other sizes: {first(resized)}" if resized else str(e).splitlines()[0])
    if problems:
        fail(f"{flag} {path}: weights do not fit the model ({'; '.join(problems)})")


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, except that the kernel choice (fused, foreach, capturable) stays
    the one `optimizer` was built with for this device: a CPU checkpoint resumed on CUDA gets the
    fused kernels, a CUDA one resumed on a CPU leaves them."""
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable")
               if k in optimizer.defaults}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **kernels}
                                                         for group in state["param_groups"]]})


def config_from(build, checkpoint, flag, path):
    """`build(checkpoint)` -> the model config it reads (or the model it builds), or one line naming
    the file when the checkpoint's config describes no model this version builds (a missing or
    unknown field, a value of the wrong type, a size of 0 or less)."""
    try:
        return build(checkpoint)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError,
            RuntimeError) as e:
        fail(f"{flag} {path}: its config does not describe a model this version builds "
             f"({type(e).__name__}: {e})")


def run_settings(checkpoint):
    """The command line a checkpoint was trained with (what --resume continues)."""
    return checkpoint.get("run_config", checkpoint.get("config"))


def vqvae_config(checkpoint, sizes):
    """A VQ-VAE checkpoint's VQVAEConfig: its model_config; for files from before model configs,
    the flags of its command line, the original's value for a flag that did not exist yet; for
    the original repo's bare state_dicts, the original model at its codebook's sizes."""
    if "model_config" in checkpoint:
        config = VQVAEConfig(**checkpoint["model_config"])
    elif checkpoint.get("config") is None:   # its codebook (K, D) holds the sizes it had
        codebook = checkpoint["state_dict"].get("codeBook.embedding.weight")
        k, hidden_size = codebook.shape if isinstance(codebook, torch.Tensor) and \
            codebook.dim() == 2 else (sizes.get("k", 512), sizes.get("hidden_size", 40))
        config = original_config_with(hidden_size=int(hidden_size), k=int(k))
    else:
        flags = checkpoint["config"]
        config = VQVAEConfig(**{f.name: flags.get(f.name, getattr(ORIGINAL_CONFIG, f.name))
                                for f in fields(VQVAEConfig)})
    for name in ("hidden_size", "k"):  # a size of 0 would build a model of empty layers
        size = getattr(config, name)
        if type(size) is not int or size < 1:
            raise ValueError(f"{name} {size!r} is not a positive integer")
    return config


def load_vqvae(path, device, flag="--model", sizes=None):
    """A VQ-VAE from a checkpoint, in eval mode -> (model, checkpoint). The checkpoint's config
    (or an original-style bare state_dict's codebook) decides the model; `sizes` ({'hidden_size':
    D, 'k': K}, from flags the user gave) must agree with it."""
    checkpoint = load_checkpoint(path, "vqvae", flag)
    sizes = sizes or {}
    config = config_from(lambda c: vqvae_config(c, sizes), checkpoint, flag, path)
    for key, value in sizes.items():
        if value != getattr(config, key):
            fail(f"{SIZE_FLAGS[key]} {value} contradicts {flag} {path}, "
                 f"which was trained with {getattr(config, key)}")
    model = config_from(lambda _: vqvae_from_config(config), checkpoint, flag, path)
    state_dict = checkpoint["state_dict"]
    if "model_config" not in checkpoint and checkpoint.get("config") is None:  # the original's
        state_dict = with_original_codebook_buffers(state_dict)
    load_state(model, state_dict, flag, path)
    return model.to(device).eval(), checkpoint


# The original repo's codebook is a bare nn.Embedding: its files hold none of these buffers.
ORIGINAL_MISSING_BUFFERS = ("codeBook.cluster_size", "codeBook.embed_avg", "codeBook.initialized")


def with_original_codebook_buffers(state_dict):
    """A bare state_dict written by the original repo -> the same with the three codebook buffers
    a loss-codebook, already-initialised model has (the original's configuration). Anything else
    that is missing or extra is left for `load_state` to refuse."""
    weight = state_dict.get("codeBook.embedding.weight")
    if weight is None or any(key in state_dict for key in ORIGINAL_MISSING_BUFFERS):
        return state_dict
    return {**state_dict, "codeBook.cluster_size": torch.ones(len(weight)),
            "codeBook.embed_avg": weight.clone(), "codeBook.initialized": torch.tensor(True)}


def prior_config_of(checkpoint):
    """A prior checkpoint's config dataclass; for files from before model configs, read from the
    flags of its command line (--hidden-size was the channels, or the transformer's width)."""
    if "model_config" in checkpoint:
        return prior_config(checkpoint["model_config"])
    flags = checkpoint["config"]
    common = {"k": flags["k"], "num_layers": flags["num_layers"],
              "dropout": flags.get("dropout", 0.0),
              "unconditional": flags.get("label_dropout", 0.0) > 0}
    if flags.get("arch", "gated_pixelcnn") == "transformer":
        return CodeTransformerConfig(width=flags["hidden_size"], heads=flags["heads"], **common)
    return GatedPixelCNNConfig(channels=flags["hidden_size"], **common)


def load_prior(path, device, K=None, flag="--prior-model", vqvae_path=None):
    """A prior checkpoint of pixelcnn_prior.py (either --arch), in eval mode; it must model codes
    of K entries (None: any), and with `vqvae_path` a warning says when it was trained over the
    codes of another VQ-VAE than that one (`warn_if_over_another_vqvae`)."""
    checkpoint = load_checkpoint(path, "prior", flag)
    config = config_from(prior_config_of, checkpoint, flag, path)
    if K is not None and config.k != K:
        fail(f"{flag} {path} was built for a codebook of K={config.k}, but the VQ-VAE has K={K}")
    if vqvae_path:
        warn_if_over_another_vqvae(checkpoint, path, vqvae_path)
    prior = config_from(lambda _: prior_from_config(config), checkpoint, flag, path)
    load_state(prior, checkpoint["state_dict"], flag, path)
    return prior.to(device).eval()


def same_weights(path, flag, other, other_flag):
    """Whether the VQ-VAE checkpoints at `path` and `other` hold the same weights (one file moved or
    copied); the flags name them in an error."""
    if os.path.isfile(path) and os.path.isfile(other) and os.path.samefile(path, other):
        return True
    mine, theirs = load_checkpoint(path, "vqvae", flag)["state_dict"], \
        load_checkpoint(other, "vqvae", other_flag)["state_dict"]
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def here(recorded):
    """A VQ-VAE path a prior recorded -> that file on this machine, or None: as recorded, else (a
    prior trained in another clone over a committed VQ-VAE) the committed file of that name. Other
    runs are not guessed at by name: another run of the same name is another VQ-VAE."""
    if not isinstance(recorded, str):
        return None
    if os.path.isfile(recorded):
        return recorded
    head, name = os.path.split(os.path.normpath(recorded))
    committed = os.path.join(PRETRAINED, name)
    return committed if os.path.basename(head) == "pretrained" and \
        os.path.basename(os.path.dirname(head)) == "models" and os.path.isfile(committed) else None


def warn_if_over_another_vqvae(checkpoint, prior_path, vqvae_path):
    """A prior draws the codes of the VQ-VAE it was trained over; another VQ-VAE with the same K
    decodes them into noise. A warning where the prior's own VQ-VAE (its loaded `checkpoint`
    names it) is on this machine and `vqvae_path` holds other weights (a prior whose VQ-VAE is
    elsewhere cannot be checked)."""
    trained_over = here(run_settings(checkpoint).get("vqvae_model"))
    if not trained_over:
        return
    try:   # advice only: a recorded file that does not load is nothing to compare with
        with contextlib.redirect_stderr(io.StringIO()):
            differs = not same_weights(vqvae_path, "--model", trained_over, "")
    except SystemExit:
        return
    if differs:
        print(f"warning: --prior-model {prior_path} was trained over the codes of {trained_over}, "
              f"not of {vqvae_path}, whose weights differ: its samples are unlikely to be digits",
              file=sys.stderr)


def load_classifier(path, device, flag="--classifier"):
    """A judge classifier of classifier.py (either --arch), in eval mode."""
    checkpoint = load_checkpoint(path, "classifier", flag)
    config = config_from(lambda c: JudgeConfig(**(c.get("model_config") or {
        "arch": c["config"].get("arch", "cnn")})), checkpoint, flag, path)
    classifier = config_from(lambda _: judge_from_config(config), checkpoint, flag, path)
    load_state(classifier, checkpoint["state_dict"], flag, path)
    return classifier.to(device).eval()
