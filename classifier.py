"""Train the small MNIST classifier that judges generated digits (sample_quality.py).

    python classifier.py --output-folder classifier

Trains on the first 50,000 training images; the last 10,000 stay held out so that their Frechet
distance to the test set is a fair floor for generated samples. Writes models/<output-folder>/best.pt.
"""
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import save_checkpoint
from cli import ArgumentParser, nonnegative_int, positive_float, positive_int, resolve_device
from data import MNISTSplit
from modules import MNISTClassifier
from runs import make_output_dirs

TRAIN_IMAGES = 50000  # images 50,000 .. 59,999 are held out


@torch.no_grad()
def accuracy(model, split):
    model.eval()
    correct = sum((model(images).argmax(1) == labels).sum().item()
                  for images, labels in split.batches(1000))
    return correct / len(split)


def main():
    p = ArgumentParser(prog="classifier.py", description="Train the MNIST judge classifier.")
    p.add_argument("--output-folder", default="classifier")
    p.add_argument("--data-folder", default="data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-epochs", type=positive_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--train-subset", type=positive_int, default=TRAIN_IMAGES)
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model_dir = os.path.join("models", args.output_folder)
    make_output_dirs(model_dir)
    train_set = MNISTSplit(args.data_folder, True, device, limit=min(args.train_subset, TRAIN_IMAGES))
    test_set = MNISTSplit(args.data_folder, False, device)
    model = MNISTClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.num_epochs * -(-len(train_set) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    for epoch in range(args.num_epochs):
        model.train()
        order = torch.randperm(len(train_set))
        for images, labels in tqdm(train_set.batches(args.batch_size, order), leave=False,
                                   total=-(-len(train_set) // args.batch_size)):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        test_accuracy = accuracy(model, test_set)
        print(f"epoch {epoch + 1}/{args.num_epochs}  test accuracy {test_accuracy:.4f}")
    save_checkpoint(os.path.join(model_dir, "best.pt"),
                    {"kind": "classifier", "state_dict": model.state_dict(),
                     "config": {k: v for k, v in vars(args).items()},
                     "metrics": {"test_accuracy": test_accuracy}})
    print(f"wrote {model_dir}/best.pt")


if __name__ == "__main__":
    main()
