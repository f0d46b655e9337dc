"""Train an MNIST classifier that judges generated digits (sample_quality.py).

    python classifier.py --output-folder classifier                      # the CNN judge
    python classifier.py --arch mlp --seed 1 --output-folder classifier_mlp   # the second judge
    python classifier.py --resume models/classifier/last.pt      # continue an interrupted run

Trains on the first 50,000 training images; the last 10,000 (--hold-out) stay out of training,
choose best.pt (highest accuracy on them) and are sample_quality.py's floor of real images; the test
set only reports. Writes models/<output-folder>/best.pt and last.pt (everything needed to resume),
and TensorBoard logs to logs/<output-folder>/. Ctrl-C, a NaN loss, an existing run: as for VQ-VAE.py
(runs.TrainingRun).
"""
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import (ArgumentParser, add_data_and_device_flags, fail, positive_float,
                 positive_int, resolve_device, seed_int)
from data import HOLD_OUT, TRAIN_IMAGES, MNISTSplit, check_training_split, training_slices
from judges import JUDGES, JudgeConfig, judge_from_config
from runs import (TrainingRun, add_run_flags, parse_run_args, resume_is_complete,
                  seed_everything)
from training import make_optimizer

# num_epochs: the one-cycle schedule spans the run
LOCKED_ON_RESUME = ("arch", "num_epochs", "batch_size", "lr", "seed", "train_subset", "hold_out",
                    "augment")
# Runs from before these flags trained on the first 50,000 images, unaugmented: resumed, go on so.
BEFORE_FLAGS = {"hold_out": HOLD_OUT, "augment": False}


def shift_and_rotate(images, max_shift=2, max_degrees=10):
    """images (B, 1, 28, 28) -> each moved by up to `max_shift` pixels and turned by up to
    `max_degrees` (a random affine map per image, drawn on the images' device)."""
    B = len(images)
    angle = (torch.rand(B, device=images.device) * 2 - 1) * max_degrees * torch.pi / 180
    shift = (torch.rand(B, 2, device=images.device) * 2 - 1) * max_shift * 2 / 28
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)          # (B, 2, 3)
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False) - 1    # background stays -1


@torch.no_grad()
def accuracy(model, split):
    model.eval()
    correct = sum((model(images).argmax(1) == labels).sum().item()
                  for images, labels in split.batches(1000))
    model.train()
    return correct / len(split)


def build_parser():
    p = ArgumentParser(prog="classifier.py", description="Train the MNIST judge classifier.")
    p.add_argument("--output-folder", default="classifier")
    p.add_argument("--arch", choices=sorted(JUDGES), default="cnn",
                   help="cnn: the small CNN judge; mlp: a pixel MLP, the second judge")
    add_data_and_device_flags(p)
    p.add_argument("--num-epochs", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak of the one-cycle rate")
    p.add_argument("--augment", action="store_true",
                   help="train on randomly shifted (up to 2 pixels) and rotated (up to 10 degrees) "
                        "images: the third judge, which sees digits otherwise than the first two")
    p.add_argument("--seed", type=seed_int, default=0)
    add_run_flags(p, "images", HOLD_OUT)
    return p


def parse_args(argv=None):
    args, checkpoint = parse_run_args(build_parser(), "classifier", LOCKED_ON_RESUME, argv,
                                      before_flags=BEFORE_FLAGS)
    check_training_split(args.hold_out, args.train_subset, least_hold_out=1)
    train_images = min(args.train_subset or TRAIN_IMAGES, TRAIN_IMAGES - args.hold_out)
    # The MLP's BatchNorm1d has no statistics over one image (the CNN's BatchNorm2d averages
    # over its pixels too, so it trains on any batch).
    if args.arch == "mlp" and (args.batch_size == 1 or train_images % args.batch_size == 1):
        fail(f"--batch-size {args.batch_size}: the {train_images} training images would give the "
             f"mlp judge a batch of one image, which BatchNorm cannot train on; expected another "
             f"batch size")
    return args, checkpoint


def main(args, checkpoint=None):
    if resume_is_complete(args, checkpoint):   # nothing read, nothing written
        return
    device = resolve_device(args.device)
    shuffle = seed_everything(args.seed)
    train_set, held_out = training_slices(args.data_folder, device, args.hold_out,
                                          args.train_subset)
    test_set = MNISTSplit(args.data_folder, False, device, limit=args.test_subset)
    config = JudgeConfig(args.arch)
    model = judge_from_config(config).to(device)
    optimizer = make_optimizer(model, args.lr, device)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr,
                                                    total_steps=args.num_epochs * steps_per_epoch)
    state = {"state_dict": model, "optimizer": optimizer, "scheduler": scheduler}
    with TrainingRun("classifier.py", "classifier", args, asdict(config), state, checkpoint,
                     shuffle, ("loss/train/cross_entropy",), device=device) as run:
        print(f"training {args.output_folder}: {len(train_set)} train / {len(held_out)} held-out / "
              f"{len(test_set)} test images, device {device}, seed {args.seed}")
        model.train()
        for epoch in run.epochs(args.num_epochs, steps_per_epoch):
            # batch
            for images, labels in tqdm(train_set.batches(args.batch_size,
                                                         run.shuffled(len(train_set)),
                                                         run.batch_in_epoch),
                                       leave=False, total=steps_per_epoch,
                                       initial=run.batch_in_epoch):
                # step
                if args.augment:
                    images = shift_and_rotate(images)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                # log
                run.step_done(loss.detach()[None])
            # evaluate: the held-out images choose, the test images report
            metrics = {"held_out_accuracy": accuracy(model, held_out),
                       "test_accuracy": accuracy(model, test_set)}
            run.writer.add_scalar("accuracy/held_out", metrics["held_out_accuracy"], epoch + 1)
            run.writer.add_scalar("accuracy/test", metrics["test_accuracy"], epoch + 1)
            run.writer.flush()
            # save: best.pt (highest held-out accuracy), last.pt
            run.save_epoch(metrics, -metrics["held_out_accuracy"])
            print(f"epoch {epoch + 1}/{args.num_epochs}  held-out accuracy "
                  f"{metrics['held_out_accuracy']:.4f}  test accuracy "
                  f"{metrics['test_accuracy']:.4f}")
        if run.rank == 0 and os.path.exists(os.path.join(run.model_dir, "best.pt")):
            print(f"{run.model_dir}/best.pt: held-out accuracy {-run.best:.4f}")


if __name__ == "__main__":
    main(*parse_args())
