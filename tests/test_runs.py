"""The run machinery the three trainers share (runs.TrainingRun): resume, Ctrl-C/SIGTERM, NaN
stops, overwrite protection, run folders claimed by one run, the random states."""
import copy
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import (CLASSIFIER, CONSTANT_LR, REPO, TINY, assert_clean_failure,
                      assert_same_weights, interrupt_then_resume, prior_flags, run, run_files,
                      signal_run_flags)


def test_two_runs_of_one_name_cannot_both_write(tmp_path, monkeypatch, capsys):
    """Two runs started at once under one --output-folder both pass the early check (no
    checkpoint yet); the claim on models/<name> lets the first in and stops the second in one line."""
    from runs import prepare_run_folders
    monkeypatch.chdir(tmp_path)
    _, model_dir, claim = prepare_run_folders("same", None, False)
    with pytest.raises(SystemExit) as exit_info:
        prepare_run_folders("same", None, False)
    assert exit_info.value.code == 2
    assert "another run is writing to models/same/" in capsys.readouterr().err
    claim.release()  # the first run ended: the name is free again
    prepare_run_folders("same", None, False)


def test_overwrite_by_another_runs_resume_starts_the_folder_afresh(tmp_path, monkeypatch):
    """--resume of run a's checkpoint into run b's folder with --overwrite deletes b's earlier
    checkpoints and event files (b's best.pt would otherwise outlive b); resuming b itself keeps
    them, and deletes only a killed save's partial file."""
    from runs import prepare_run_folders
    monkeypatch.chdir(tmp_path)
    earlier = [tmp_path / "models" / "b" / "best.pt", tmp_path / "models" / "b" / "model_5.pt",
               tmp_path / "logs" / "b" / "events.out.tfevents.1.host"]
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"earlier run")
    killed_mid_save = tmp_path / "models" / "b" / "last.pt.tmp-123-0a1b2c3d"
    killed_mid_save.write_bytes(b"partial")
    prepare_run_folders("b", "models/b/last.pt", False)[2].release()
    assert all(path.exists() for path in earlier) and not killed_mid_save.exists()
    (tmp_path / "link").symlink_to(tmp_path)   # the same run by another path: not replaced
    with pytest.raises(SystemExit):
        prepare_run_folders("b", "link/models/b/last.pt", True)
    assert all(path.exists() for path in earlier)
    prepare_run_folders("b", "models/a/last.pt", True)[2].release()
    assert not any(path.exists() for path in earlier)


def test_an_epoch_logged_twice_reads_as_its_last_value(tmp_path, data_folder):
    """A constant-rate run stopped by --max-steps mid-epoch 1 evaluates it; resumed, it logs epoch
    1's test figures again: the readers (compare_quantizers.py, readme_figures.py) keep the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from runs import one_value_per_step
    run("VQ-VAE.py", "--output-folder", "cut", "--data-folder", data_folder, "--num-epochs", "2",
        "--max-steps", "5", *TINY, *CONSTANT_LR, cwd=tmp_path)
    run("VQ-VAE.py", "--resume", "models/cut/last.pt", "--max-steps", "32", "--data-folder",
        data_folder, cwd=tmp_path)
    events = EventAccumulator(str(tmp_path / "logs" / "cut")).Reload().Scalars("loss/testing_loss")
    assert [e.step for e in events] == [1, 1, 2]
    assert one_value_per_step(events) == ([1, 2], [events[1].value, events[2].value])


def test_resume_after_an_epoch_is_bit_identical(trained_run, tmp_path, data_folder):
    """The shared run's model_1.pt, resumed to 2 epochs, ends where the run itself did."""
    cwd, _ = trained_run
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    shutil.copy(cwd / "models" / "tiny" / "model_1.pt", tmp_path / "models" / "tiny" / "last.pt")
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "2",
        "--data-folder", data_folder, cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")
    assert_same_weights(cwd / "models" / "tiny" / "model_2.pt",
                        tmp_path / "models" / "tiny" / "model_2.pt")


def test_max_steps_mid_epoch_then_more_steps_is_bit_identical(trained_run, tmp_path, data_folder):
    """--max-steps 10 ends epoch 1 (16 steps) mid-way: evaluated and saved as mid-epoch, so a
    resume with the same steps has nothing to train and one with all 32 finishes epoch 1 and ends
    where the shared 2-epoch run did, rather than skipping the rest of epoch 1."""
    cwd, _ = trained_run
    flags = ["--output-folder", "tiny", "--data-folder", data_folder, "--num-epochs", "2", *TINY,
             *CONSTANT_LR]
    run("VQ-VAE.py", *flags, "--max-steps", "10", cwd=tmp_path)
    cut = torch.load(tmp_path / "models" / "tiny" / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["batch_in_epoch"], cut["step"], cut["evaluated"]) == (0, 10, 10, True)
    assert run_files(tmp_path / "models" / "tiny") == ["best.pt", "last.pt"]  # no model_1.pt yet
    logs = sorted(os.listdir(tmp_path / "logs" / "tiny"))
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--data-folder", data_folder,
                 cwd=tmp_path)
    assert "is complete: 0 of 2 epochs, 10 steps" in result.stdout
    assert sorted(os.listdir(tmp_path / "logs" / "tiny")) == logs  # no new event file
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--max-steps", "32", "--data-folder",
        data_folder, cwd=tmp_path)
    assert_same_weights(cwd / "models" / "tiny" / "last.pt", tmp_path / "models" / "tiny" / "last.pt")
    assert_same_weights(cwd / "models" / "tiny" / "model_1.pt",
                        tmp_path / "models" / "tiny" / "model_1.pt")  # the whole epoch 1


def test_signal_saves_last_and_resume_is_bit_identical(uninterrupted_run, tmp_path, data_folder,
                                                       signum=2):
    """Ctrl-C (SIGINT) mid-run, then --resume: the uninterrupted run's weights, exactly. The same
    handler takes SIGTERM: the classifier's and the torchrun tests send that one."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "VQ-VAE.py"), "--output-folder",
                                "cut", *signal_run_flags(data_folder)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().startswith("training")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"--resume models/cut/last.pt --data-folder {data_folder} --device cpu" in stderr
    cut = torch.load(tmp_path / "models" / "cut" / "last.pt", weights_only=True)
    assert 0 < cut["step"] < 32  # stopped mid-run, after finishing a step
    run("VQ-VAE.py", "--resume", "models/cut/last.pt", "--data-folder", data_folder, cwd=tmp_path)
    assert_same_weights(uninterrupted_run, tmp_path / "models" / "cut" / "last.pt")


def test_a_damaged_training_state_is_refused_in_one_line(trained_run, tmp_path, data_folder):
    """A resume whose run settings or training state were damaged (a value its flag would refuse,
    a counter that is no count, junk optimizer or random states) stops in one line naming the
    file, before any folder or file is made, rather than as a traceback mid-run."""
    cwd, _ = trained_run
    good = torch.load(cwd / "models" / "tiny" / "last.pt", weights_only=True)
    damages = {
        "no run settings": (lambda c: c.pop("run_config"), "no run settings"),
        "settings as a list": (lambda c: c.update(run_config=[1]), "no run settings"),
        "batch size 0": (lambda c: c["run_config"].update(batch_size=0), "--batch-size 0"),
        "lr nan": (lambda c: c["run_config"].update(lr=float("nan")), "--lr nan"),
        "lr as text": (lambda c: c["run_config"].update(lr="0.1"), "--lr '0.1'"),
        "unknown quantizer": (lambda c: c["run_config"].update(quantizer="pq"), "--quantizer"),
        "epoch as text": (lambda c: c.update(epoch="1"), "epoch '1'"),
        "no epoch": (lambda c: c.pop("epoch"), "epoch None"),
        "junk optimizer": (lambda c: c.update(optimizer={"state": 1}), "optimizer"),
        "junk random states": (lambda c: c["rng"].update(torch=torch.zeros(3)), "random states"),
    }
    for name, (damage, words) in damages.items():
        checkpoint = copy.deepcopy(good)
        damage(checkpoint)
        torch.save(checkpoint, tmp_path / "damaged.pt")
        result = run("VQ-VAE.py", "--resume", "damaged.pt", "--num-epochs", "3", "--output-folder",
                     "damaged", "--data-folder", data_folder, cwd=tmp_path, check=False)
        assert_clean_failure(result, "--resume damaged.pt", words)
        assert sorted(os.listdir(tmp_path)) == ["damaged.pt"], name
    from runs import check_counters   # an integer best score is what --hold-out 0 priors saved
    check_counters({**good, "best_score": 0}, "prior.pt")


def test_a_killed_runs_events_do_not_merge_into_the_next(trained_run, tmp_path, data_folder):
    """kill -9 leaves event files behind: those of a run killed before its first checkpoint are
    deleted by the next run of that name (nothing else of it is left), and what a run logged after
    its last checkpoint is purged from TensorBoard's view by the resume (one value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    cwd, _ = trained_run
    tag = "loss/train/training_loss"
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "tiny")   # 2 epochs, 32 steps
    for name, steps in (("tiny", range(33, 41)), ("fresh", range(1, 9))):    # the killed runs
        with SummaryWriter(str(tmp_path / "logs" / name)) as writer:
            for step in steps:
                writer.add_scalar(tag, 999.0, step)
    time.sleep(1.1)  # event file names hold the second they were made: the new one sorts later
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "3", "--log-every", "4",
        "--data-folder", data_folder, cwd=tmp_path)
    run("VQ-VAE.py", "--output-folder", "fresh", "--num-epochs", "1", *TINY, "--log-every", "4",
        "--data-folder", data_folder, cwd=tmp_path)
    for name, first in (("tiny", 33), ("fresh", 1)):
        events = EventAccumulator(str(tmp_path / "logs" / name)).Reload().Scalars(tag)
        assert [e.step for e in events] == list(range(first, first + 16)), name
        assert 999.0 not in [e.value for e in events], name
    assert len(os.listdir(tmp_path / "logs" / "fresh")) == 1


def test_resume_cannot_stretch_a_cosine_schedule(uninterrupted_run, tmp_path):
    result = run("VQ-VAE.py", "--resume", uninterrupted_run, "--num-epochs", "3", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--num-epochs 3", "cosine")
    result = run("VQ-VAE.py", "--resume", uninterrupted_run, "--max-steps", "5", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--max-steps 5", "trained without --max-steps", "cosine")
    assert not (tmp_path / "models").exists()


def test_nan_loss_stops_training_and_keeps_checkpoints(trained_run, data_folder, tmp_path):
    cwd, _ = trained_run
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "3",
                 "--data-folder", data_folder, "--log-every", "4", "--lr", "1e30", cwd=cwd,
                 check=False)
    assert result.returncode == 2 and "--lr" in result.stderr  # a resume cannot change the lr
    result = run("VQ-VAE.py", "--output-folder", "nan", "--data-folder", data_folder,
                 "--lr", "1e30", "--log-every", "4", "--num-epochs", "1", *TINY, cwd=tmp_path,
                 check=False)
    assert result.returncode == 1
    assert "loss became nan at step" in result.stderr and "Traceback" not in result.stderr
    assert not run_files(tmp_path / "models" / "nan")
    # A run whose loss turns non-finite after it wrote checkpoints (codewords so large that their
    # squared distances overflow): they stay as they were. Non-finite weights are refused first.
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "poisoned")
    checkpoint = torch.load(tmp_path / "models" / "poisoned" / "last.pt", weights_only=True)
    for value, words in ((float("inf"), "NaN or infinite"), (1e30, None)):
        checkpoint["state_dict"]["codeBook.embedding.weight"].fill_(value)
        torch.save(checkpoint, tmp_path / "models" / "poisoned" / "last.pt")
        before = {p.name: p.read_bytes() for p in (tmp_path / "models" / "poisoned").iterdir()}
        result = run("VQ-VAE.py", "--resume", "models/poisoned/last.pt", "--num-epochs", "3",
                     "--data-folder", data_folder, cwd=tmp_path, check=False)
        if words:
            assert_clean_failure(result, "models/poisoned/last.pt", words)
        else:
            assert result.returncode == 1, result.stderr
            assert "loss became" in result.stderr and "at step 33" in result.stderr, result.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "models" / "poisoned").iterdir()} \
            == before


def test_existing_run_is_not_overwritten(trained_run, data_folder, tmp_path):
    """Neither by a new run of its name nor by resuming another run's checkpoint into its folder."""
    cwd, _ = trained_run
    before = (cwd / "models" / "tiny" / "best.pt").read_bytes()
    result = run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, *TINY,
                 cwd=cwd, check=False)
    assert_clean_failure(result, "--overwrite", "--resume")
    (tmp_path / "other.pt").write_bytes((cwd / "models" / "tiny" / "model_1.pt").read_bytes())
    result = run("VQ-VAE.py", "--resume", str(tmp_path / "other.pt"), "--output-folder", "tiny",
                 "--data-folder", data_folder, cwd=cwd, check=False)
    assert_clean_failure(result, "--overwrite", "models/tiny/")
    assert (cwd / "models" / "tiny" / "best.pt").read_bytes() == before
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--overwrite", "--data-folder",
                 data_folder, cwd=cwd, check=False)
    assert_clean_failure(result, "--overwrite with --resume")
    assert (cwd / "models" / "tiny" / "best.pt").read_bytes() == before
    # A run killed before it wrote last.pt: the advice names a checkpoint it has
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "tiny")
    (tmp_path / "models" / "tiny" / "last.pt").unlink()
    result = run("VQ-VAE.py", "--output-folder", "tiny", "--data-folder", data_folder, *TINY,
                 cwd=tmp_path, check=False)
    assert_clean_failure(result, "--resume models/tiny/", "--overwrite")
    suggested = result.stderr.split("--resume ")[1].split()[0]
    assert suggested != "models/tiny/last.pt" and (tmp_path / suggested).is_file()


def test_resume_counts_every_typed_flag(trained_run, data_folder, tmp_path):
    """--num-epochs 10 is the default, but typed it counts: the finished 2-epoch constant-rate run
    continues (to --max-steps 40); a typed --k 512 that contradicts the run's K 32 is refused,
    and so is a locked flag's new value."""
    cwd, _ = trained_run
    shutil.copytree(cwd / "models" / "tiny", tmp_path / "models" / "tiny")
    for flag, value in (("--k", "512"), ("--beta", "0.5")):
        result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", flag, value,
                     "--data-folder", data_folder, cwd=tmp_path, check=False)
        assert_clean_failure(result, f"{flag} {value}", "trained with")
    run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--num-epochs", "10", "--max-steps", "40",
        "--data-folder", data_folder, cwd=tmp_path)
    assert torch.load(tmp_path / "models" / "tiny" / "last.pt", weights_only=True)["step"] == 40


def test_resume_rejects_weights_only_checkpoints(tmp_path, data_folder):
    pretrained = os.path.join(REPO, "models", "pretrained", "prior_mnist.pt")
    result = run("pixelcnn_prior.py", "--resume", pretrained, "--vqvae-model",
                 os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt"), "--data-folder",
                 data_folder, cwd=tmp_path, check=False)
    assert_clean_failure(result, "--resume", "optimizer state")
    bare = torch.load(os.path.join(REPO, "models", "pretrained", "vqvae_mnist.pt"),
                      weights_only=True)["state_dict"]
    torch.save(bare, tmp_path / "bare.pt")  # the original's checkpoint format
    result = run("VQ-VAE.py", "--resume", "bare.pt", "--data-folder", data_folder, cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--resume bare.pt", "optimizer state")
    assert not (tmp_path / "models").exists()


def test_prior_signal_then_resume_is_bit_identical(trained_prior, trained_run, data_folder,
                                                  tmp_path):
    """Ctrl-C in the shared prior's run, then --resume: the shared prior's weights, exactly."""
    cwd, _ = trained_prior
    interrupt_then_resume("pixelcnn_prior.py", [*prior_flags(trained_run, data_folder),
                                                "--num-epochs", "2"], tmp_path, "cut", "prior")
    assert_same_weights(cwd / "models" / "prior" / "last.pt",
                        tmp_path / "models" / "cut" / "last.pt")


@pytest.mark.parametrize("script", ["pixelcnn_prior.py", "classifier.py"])
def test_other_trainers_stop_on_nan_without_writing(trained_run, data_folder, tmp_path, script):
    flags = [*prior_flags(trained_run, data_folder), "--num-epochs", "1"] \
        if script == "pixelcnn_prior.py" else ["--data-folder", data_folder, "--train-subset",
                                               "1024", "--hold-out", "256", "--test-subset", "256",
                                               "--num-epochs", "1"]
    result = run(script, "--output-folder", "nan", *flags, "--lr", "1e30", "--log-every", "2",
                 cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "loss became nan at step" in result.stderr
    assert not run_files(tmp_path / "models" / "nan")


def test_classifier_keeps_its_best_epoch_and_resumes_bit_identically(trained_classifier, tmp_path,
                                                                     data_folder):
    """best.pt is the epoch of highest accuracy on the held-out training images (the test set
    only reports); SIGTERM then --resume ends bit-identical to the uninterrupted run."""
    cwd, result = trained_classifier
    held_out = [float(line.split()[4]) for line in result.stdout.splitlines()
                if line.startswith("epoch")]
    best = torch.load(cwd / "models" / "judge" / "best.pt", weights_only=True)
    assert len(held_out) == 2 and best["metrics"]["held_out_accuracy"] == max(held_out) > 0.85
    assert best["metrics"]["test_accuracy"] > 0.8
    interrupt_then_resume("classifier.py", ["--data-folder", data_folder, *CLASSIFIER], tmp_path,
                          "judge", "training", signum=15)
    assert_same_weights(cwd / "models" / "judge" / "last.pt",
                        tmp_path / "models" / "judge" / "last.pt")


@pytest.mark.parametrize("script", ["classifier.py", "pixelcnn_prior.py"])
def test_other_trainers_refuse_overwrites_and_paths(trained_classifier, trained_run, script):
    cwd, _ = trained_classifier
    vqvae = ["--vqvae-model", str(trained_run[0] / "models" / "tiny" / "best.pt")] * \
        (script == "pixelcnn_prior.py")
    (cwd / "models" / "taken").mkdir(exist_ok=True)
    (cwd / "models" / "taken" / "last.pt").write_bytes(b"an earlier run")
    result = run(script, "--output-folder", "taken", *vqvae, "--data-folder", "nowhere", cwd=cwd,
                 check=False)
    assert_clean_failure(result, "--overwrite", "--resume")
    assert (cwd / "models" / "taken" / "last.pt").read_bytes() == b"an earlier run"
    for name in ("a/b", "..", "/tmp/x"):
        result = run(script, "--output-folder", name, *vqvae, "--data-folder", "nowhere",
                     cwd=cwd, check=False)
        assert_clean_failure(result, "--output-folder")
    result = run(script, "--output-folder", "small", *vqvae, "--hold-out", "59999",
                 "--train-subset", "10", "--data-folder", "nowhere", cwd=cwd, check=False)
    assert_clean_failure(result, "--train-subset 10", "leaves 1 training images")
    assert sorted(os.listdir(cwd / "models")) == ["judge", "taken"]  # the checks ran first:
    assert not (cwd / "nowhere").exists()                             # no data was extracted


def test_resume_restores_the_rng_of_the_gpus_present(monkeypatch, capsys):
    """A checkpoint of a 2-GPU machine resumed on a 1-GPU one: GPU 0 gets its state, GPU 1's is
    skipped with a warning (set_rng_state_all would fail)."""
    import runs
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(
        (state.tolist(), index)))
    runs.restore_cuda_rng([torch.tensor([1], dtype=torch.uint8),
                              torch.tensor([2], dtype=torch.uint8)])
    assert restored == [([1], 0)]
    warning = capsys.readouterr().err
    assert "2 GPU(s)" in warning and "has 1" in warning
    runs.restore_cuda_rng([])  # a CPU run's checkpoint: nothing to restore, nothing to say
    assert restored == [([1], 0)] and capsys.readouterr().err == ""


def test_a_stop_on_the_last_step_still_evaluates_and_saves_on_resume(trained_run, tmp_path,
                                                                     data_folder):
    """A signal on a run's very last step leaves a mid-epoch last.pt with every step taken; its
    resume trains nothing, but evaluates and writes that last epoch's checkpoints."""
    cwd, _ = trained_run
    checkpoint = torch.load(cwd / "models" / "tiny" / "last.pt", weights_only=True)
    checkpoint.update(epoch=1, batch_in_epoch=16, metrics=None)  # as saved by the stop at step 32
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "models" / "tiny" / "last.pt")
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--data-folder", data_folder,
                 cwd=tmp_path)
    assert "epoch 2/2  step 32" in result.stdout and "is complete" not in result.stdout
    assert_same_weights(cwd / "models" / "tiny" / "last.pt",
                        tmp_path / "models" / "tiny" / "model_2.pt")
    result = run("VQ-VAE.py", "--resume", "models/tiny/last.pt", "--data-folder", data_folder,
                 cwd=tmp_path)
    assert "is complete: 2 of 2 epochs" in result.stdout


def test_old_runs_resume_with_the_settings_of_their_day(trained_classifier, tmp_path):
    """A classifier run from before --hold-out and --augment (one "config") resumes with the
    values it trained with; a typed value that contradicts them is refused like any locked flag."""
    cwd, _ = trained_classifier
    checkpoint = torch.load(cwd / "models" / "judge" / "last.pt", weights_only=True)
    config = checkpoint.pop("run_config")
    for key in ("hold_out", "augment"):
        del config[key]
    del checkpoint["model_config"]
    checkpoint["config"] = config
    torch.save(checkpoint, tmp_path / "old.pt")
    result = run("classifier.py", "--resume", "old.pt", "--hold-out", "500", cwd=tmp_path,
                 check=False)
    assert_clean_failure(result, "--hold-out 500", "10000")
    result = run("classifier.py", "--resume", "old.pt", "--augment", cwd=tmp_path, check=False)
    assert_clean_failure(result, "--augment", "False")
