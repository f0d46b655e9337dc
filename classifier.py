"""Train an MNIST classifier that judges generated digits (sample_quality.py).

    python classifier.py --output-folder classifier                      # the CNN judge
    python classifier.py --arch mlp --seed 1 --output-folder classifier_mlp   # the second judge
    python classifier.py --resume models/classifier/last.pt      # continue an interrupted run

Trains on the first 50,000 training images; the last 10,000 stay held out so that their Frechet
distance to the test set is a fair floor for generated samples. Writes models/<output-folder>/:
best.pt (highest test accuracy) and last.pt (everything needed to resume), and TensorBoard logs to
logs/<output-folder>/. Ctrl-C, a NaN loss, an existing run: as for VQ-VAE.py (runs.TrainingRun).
"""
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoints import load_optimizer_state, load_state
from cli import ArgumentParser, nonnegative_int, positive_float, positive_int, resolve_device
from data import MNISTSplit
from modules import CLASSIFIERS
from runs import TrainingRun, parse_run_args, rng_state, seed_everything, set_rng_state
from training import make_optimizer

TRAIN_IMAGES = 50000  # images 50,000 .. 59,999 are held out
LOCKED_ON_RESUME = ("arch", "num_epochs", "batch_size", "lr", "seed", "train_subset")  # one-cycle schedule


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
    p.add_argument("--arch", choices=sorted(CLASSIFIERS), default="cnn",
                   help="cnn: the small CNN judge; mlp: a pixel MLP, the second judge")
    p.add_argument("--data-folder", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-epochs", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak of the one-cycle rate")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--train-subset", type=positive_int, default=TRAIN_IMAGES,
                   help=f"first N training images (at most {TRAIN_IMAGES})")
    p.add_argument("--test-subset", type=positive_int, default=None, help="first N test images")
    p.add_argument("--resume", default=None, help="continue from a last.pt of this script")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run of this name")
    p.add_argument("--log-every", type=positive_int, default=50)
    return p


def parse_args(argv=None):
    return parse_run_args(build_parser(), "classifier", LOCKED_ON_RESUME, argv)


def main(args, checkpoint=None):
    device = resolve_device(args.device)
    shuffle = seed_everything(args.seed)
    train_set = MNISTSplit(args.data_folder, True, device, limit=min(args.train_subset, TRAIN_IMAGES))
    test_set = MNISTSplit(args.data_folder, False, device, limit=args.test_subset)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    model = CLASSIFIERS[args.arch]().to(device)
    optimizer = make_optimizer(model, args.lr, device)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr,
                                                    total_steps=args.num_epochs * steps_per_epoch)
    start_epoch, step, batch_in_epoch, best = 0, 0, 0, -1.0
    if checkpoint:
        load_state(model, checkpoint["state_dict"], "--resume", args.resume)
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], shuffle)
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        batch_in_epoch, best = checkpoint["batch_in_epoch"], checkpoint["best_accuracy"]
    run = TrainingRun("classifier.py", args.output_folder, args.resume, args.overwrite,
                      args.log_every, device=device)

    def checkpoint_dict(epoch, batch, shuffle_state, metrics):
        return {"kind": "classifier", "state_dict": model.state_dict(), "config": config,
                "epoch": epoch, "batch_in_epoch": batch, "step": step,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {**rng_state(shuffle), "shuffle": shuffle_state}, "best_accuracy": best,
                "metrics": metrics}

    writer = SummaryWriter(run.log_dir)
    print(f"training {args.output_folder}: {len(train_set)} train / {len(test_set)} test images, "
          f"device {device}, seed {args.seed}")
    model.train()
    for epoch in range(start_epoch, args.num_epochs):
        shuffle_state = shuffle.get_state()
        order = torch.randperm(len(train_set), generator=shuffle)
        for images, labels in tqdm(train_set.batches(args.batch_size, order, batch_in_epoch),
                                   leave=False, total=steps_per_epoch, initial=batch_in_epoch):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.record(loss.detach()[None])
            step += 1
            batch_in_epoch += 1
            if run.sync_due(step, batch_in_epoch == steps_per_epoch):
                _, signum = run.sync(step, writer, ("loss/train/cross_entropy",))
                if signum:
                    run.stop(signum, step, checkpoint_dict(epoch, batch_in_epoch, shuffle_state,
                                                           None))
        batch_in_epoch = 0
        metrics = {"test_accuracy": accuracy(model, test_set)}
        writer.add_scalar("accuracy/test", metrics["test_accuracy"], epoch + 1)
        writer.flush()
        if metrics["test_accuracy"] > best:
            best = metrics["test_accuracy"]
            run.save("best.pt", checkpoint_dict(epoch + 1, 0, shuffle.get_state(), metrics))
        run.save("last.pt", checkpoint_dict(epoch + 1, 0, shuffle.get_state(), metrics))
        print(f"epoch {epoch + 1}/{args.num_epochs}  test accuracy {metrics['test_accuracy']:.4f}")
    writer.close()
    print(f"wrote {run.model_dir}/best.pt (test accuracy {best:.4f})")


if __name__ == "__main__":
    main(*parse_args())
