"""Measure generated digits against what a perfect prior would give, under several judges.

    python sample_quality.py --model models/pretrained/vqvae_mnist.pt \\
        --prior-model models/pretrained/prior_mnist.pt [--guidance-scales 1 2] [--temperatures 1 0.7] \\
        [--guidance-interval 0 21] [--seeds 0 1 2]

A perfect prior over the training codes would draw, through the same decoder, what the VQ-VAE's
reconstructions of training images look like. So the reference is the reconstructions of the
held-out training images 50,000.. (a prior trained with --hold-out, like the committed prior,
never saw them; one trained on all 60,000 did: the output says so), and every figure has its floor:
what a perfect prior scores at this sample size, that is the same figure for N of the prior's own
training maps drawn at random (reconstructions of images 0..49,999), averaged over --floor-draws
such draws and printed with their spread: under the CNN judge one draw of 10,000 lies 0.50-0.83
from the reference (RESULTS.md, seventh pass), too wide for one draw to resolve a multiple of 1.1;
the five contiguous 10,000-image slices 0.. to 40,000.. lie 0.50-0.85, and a slice is not a random
draw of what the prior learned from. The prior is asked for the digits of the floor's first draw, so
both have the training maps' class mix (asking for every digit equally often moves the MLP judge's
Frechet distance by about 10%). The judges trained on those images too, and the two CNN judges'
features set them apart from unseen ones (RESULTS.md, seventh pass): with --floor-from held-out
the reference and the floor are two random halves of the held-out images instead, seen by no
judge, at N <= 5,000. Per source of N images (default 10,000) and per judge
(--classifiers; default the three committed judges): class agreement (real images: their label);
in the judge's 128-d features, the Frechet distance and the kernel distance (KID) to the
reference, improved precision and recall (Kynkaanniemi et al. 2019: recall falls when variety is
lost), and the Frechet distance to the test images; per source, a two-sample test: the held-out
accuracy of a fresh small CNN trained to tell the source from the reference (50% at best).

Each sampler draws once per sampling seed (--seeds), from the global generator seeded just before
it, so a seed's samples are the same whether judged alone or beside other seeds and samplers.
Over the seeds each sampler's figures are averaged, with their spread, and the protocol that
chose generate.py's default sampler is applied to those means: of the samplers whose class
agreement is at least 98.5% under each choosing judge (the CNN and MLP judges), the one with the
lowest Frechet distance as a multiple of the training floor's, the larger of its multiples under
those judges. The third judge, the held-out floor and the two-sample test take no part in the
choice: they check it.
"""
import argparse
import itertools
import json
import os

import torch

from checkpoints import (PRETRAINED, load_checkpoint, load_classifier, load_prior, load_vqvae,
                         run_settings)
from cli import (ArgumentParser, add_data_and_device_flags, add_vqvae_size_flags, int_between,
                 keep_fraction, nonnegative_int, positive_float, positive_int, resolve_device,
                 seed_int, unit_float, vqvae_sizes)
from data import HOLD_OUT, TRAIN_IMAGES, MNISTSplit, normalize, to_uint8
from distribution_measures import (frechet_distance, kernel_distance, precision_recall,
                                   two_sample_accuracy)
from sampling import guidance_scale, sample_prior, sampler_options, scale_text
from vector_quantizer import count_codes

JUDGES = [os.path.join(PRETRAINED, name)
          for name in ("classifier.pt", "classifier_mlp.pt", "classifier_aug.pt")]
REFERENCE_START = TRAIN_IMAGES - HOLD_OUT          # reconstructions of 50,000.. : the reference
FLOORS = {  # --floor-from -> the floor's name
    "training": "floor: VQ-VAE reconstructions of random training images 0..49,999 (a perfect prior)",
    "held-out": "floor: VQ-VAE reconstructions of the held-out images 50,000.. not in the reference"}
REAL = "real: the training images of the floor's first draw (its originals)"
FLOOR_DRAWS = 5
FLOOR_SEED = 0  # the floor's draws are the same for every sampling seed (--seeds)
# The protocol (RESULTS.md, "The prior under three judges"): the judges that choose the sampler,
# and the class agreement a sampler must reach under each of them
CHOOSING_JUDGES = ("classifier", "classifier_mlp")
AGREEMENT_TARGET = 0.985
# The fewest images a statistic is computed over: a k-NN ball needs k + 1 points, a covariance
# several (fewer crash the linear algebra rather than give a meaningless figure)
MIN_IMAGES = 10


def in_batches(fn, tensor, batch_size=1000):
    return torch.cat([fn(chunk) for chunk in tensor.split(batch_size)])


def build_parser():
    p = ArgumentParser(prog="sample_quality.py", description="Judge generated digits.")
    p.add_argument("--model", required=True, help="VQ-VAE checkpoint")
    p.add_argument("--prior-model", required=True)
    p.add_argument("--classifiers", "--classifier", nargs="+", default=JUDGES, metavar="CKPT",
                   help="judges written by classifier.py (default: the committed CNN, MLP and "
                        "augmented-CNN judges)")
    p.add_argument("--num-samples", type=int_between(MIN_IMAGES, HOLD_OUT), default=None,
                   metavar="N", help=f"samples per sampler and seed, and the reference's size "
                                     f"(default {HOLD_OUT:,}; {HOLD_OUT // 2:,}, the most, with "
                                     f"--floor-from held-out)")
    p.add_argument("--floor-draws", type=positive_int, default=None, metavar="D",
                   help="random draws of N training maps the floor is averaged over (default "
                        f"{FLOOR_DRAWS}; --floor-from training only)")
    p.add_argument("--floor-from", choices=FLOORS, default="training",
                   help="held-out: split the held-out images 50,000.. at random into the "
                        "reference and the floor (N at most 5,000, one draw), so that neither "
                        "was seen by the judges, which trained on images 0..49,999 (default: "
                        "training, random draws of the prior's training maps)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also judge noise and codes drawn uniformly or from their histogram "
                        "(--no-baselines: the floor, the real images and the prior only)")
    p.add_argument("--guidance-scales", type=guidance_scale, nargs="+", default=[None],
                   metavar="S", help="each one scale, or ten comma-separated (per digit, as "
                                     "generate.py --guidance-scale); default: generate.py's "
                                     "default for this prior")
    p.add_argument("--temperatures", type=positive_float, nargs="+", default=[1.0])
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=unit_float, default=1.0)
    p.add_argument("--guidance-interval", type=nonnegative_int, nargs=2, default=None,
                   metavar=("START", "STOP"), help="guide only these raster positions")
    p.add_argument("--keeps", type=keep_fraction, nargs="+", default=[None], metavar="F",
                   help="generate.py --keep: the fraction of drawn maps kept per digit, by the "
                        "prior's own evidence (default: generate.py's default for this prior)")
    add_data_and_device_flags(p)
    p.add_argument("--test-subset", type=int_between(MIN_IMAGES, 10000), default=None,
                   help="the test images compared with: the first N (default: all 10,000)")
    p.add_argument("--seeds", "--seed", type=seed_int, nargs="+", default=[0], metavar="S",
                   help="sampling seeds: each sampler draws N samples per seed; figures are also "
                        "averaged over them, and the protocol chooses on the means (the baselines "
                        "use the first)")
    p.add_argument("--json", action="store_true")
    add_vqvae_size_flags(p)
    return p


def reconstructions(vqvae, images):
    return to_uint8(in_batches(lambda x: vqvae(x)[0], normalize(images)))


def baseline_sources(vqvae, train, n, device, seed):
    """Images any prior should beat -> {name: (uint8 images (n, 1, 28, 28), None)}. They draw from
    a generator of their own, so neither they nor the prior's samples depend on what the other
    consumed."""
    K = vqvae.codeBook.K
    g = torch.Generator(device).manual_seed(seed)
    histogram = count_codes(in_batches(vqvae.encode, normalize(train.images[:n])), K)
    noise = torch.normal(0.5, 0.5, (n, 1, 28, 28), generator=g, device=device)
    uniform = torch.randint(K, (n, 7, 7), generator=g, device=device)
    by_histogram = torch.multinomial(histogram, n * 49, replacement=True, generator=g)
    return {
        "original `--input random` (noise through the VQ-VAE)": (
            to_uint8(in_batches(lambda x: vqvae(x)[0], noise)), None),
        "codes drawn uniformly": (to_uint8(in_batches(vqvae.decode, uniform)), None),
        "codes drawn from their training histogram": (to_uint8(in_batches(
            vqvae.decode, by_histogram.view(n, 7, 7))), None)}


def floor_indices(n, draws, floor_from="training"):
    """-> (the reference's indices into the training images (n,), the floor's draws: `draws`
    index tensors (n,)), the same whatever --seeds (a generator of their own). From "training":
    the reference is images 50,000.., each draw a random one of images 0..49,999 without
    replacement; from "held-out": the images 50,000.. in random order, the reference the first n,
    the one draw the next n (n at most 5,000, half of them: main checks --num-samples)."""
    g = torch.Generator().manual_seed(FLOOR_SEED)
    if floor_from == "training":
        return (torch.arange(REFERENCE_START, REFERENCE_START + n),
                [torch.randperm(REFERENCE_START, generator=g)[:n] for _ in range(draws)])
    held_out = REFERENCE_START + torch.randperm(HOLD_OUT, generator=g)
    return held_out[:n], [held_out[n:2 * n]]


@torch.no_grad()
def judge_sources(classifier, sources, reference, test_images):
    """-> {source name: {agreement, frechet_distance, kid, precision, recall, frechet_to_test}}
    under one judge; the distances are to the reference images, in the judge's features."""
    features = lambda images: in_batches(lambda x: classifier.features(normalize(x[:, 0])),  # noqa: E731
                                         images)
    reference_features, test_features = features(reference), features(test_images)
    results = {}
    for name, (images, wanted) in sources.items():
        mine = features(images)
        predicted = in_batches(lambda x: classifier(normalize(x[:, 0])), images).argmax(1)
        precision, recall = precision_recall(reference_features, mine)
        results[name] = {"agreement": None if wanted is None else
                         (predicted == wanted).float().mean().item(),
                         "frechet_distance": frechet_distance(mine, reference_features),
                         "kid": kernel_distance(mine, reference_features),
                         "precision": precision, "recall": recall,
                         "frechet_to_test": frechet_distance(mine, test_features)}
    return results


def judge_rows(judges, sources, reference, test_images):
    """-> one row per source: {source, images, two_sample_accuracy, judges: {judge: figures}}."""
    by_judge = {name: judge_sources(c, sources, reference, test_images)
                for name, c in judges.items()}
    return [{"source": name, "images": len(images),
             "two_sample_accuracy": two_sample_accuracy(images.cpu(), reference.cpu()),
             "judges": {judge: by_judge[judge][name] for judge in judges}}
            for name, (images, _) in sources.items()]


def mean_row(source, draws):
    """Rows of one source's draws (the floor's random draws, or one sampler's seeds) -> one row of
    their means, with their standard deviations under "spread" (how far one draw strays, not the
    mean's error; 0 for a single draw) and each draw's figures under "draws"."""
    def stats(values):  # -> (mean, population standard deviation)
        values = torch.tensor(values, dtype=torch.float64)
        return values.mean().item(), values.std(correction=0).item()
    two_sample = stats([row["two_sample_accuracy"] for row in draws])
    judged = {judge: {figure: stats([row["judges"][judge][figure] for row in draws])
                      for figure in draws[0]["judges"][judge]} for judge in draws[0]["judges"]}
    return {"source": source, "images": draws[0]["images"],
            "two_sample_accuracy": two_sample[0],
            "judges": {j: {f: mean for f, (mean, _) in fs.items()} for j, fs in judged.items()},
            "spread": {"two_sample_accuracy": two_sample[1],
                       "judges": {j: {f: std for f, (_, std) in fs.items()}
                                  for j, fs in judged.items()}},
            "draws": [{"two_sample_accuracy": row["two_sample_accuracy"],
                       "judges": row["judges"]} for row in draws]}


def protocol_choice(samplers, floor):
    """The sampler rows averaged over the seeds and the floor's row -> the protocol's choice
    {"sampler", "multiple"}, or None when no sampler reaches AGREEMENT_TARGET under every choosing
    judge, they were not all judging, or the floor is not the training floor (the held-out floor
    checks the choice, it takes no part in it). A sampler's multiple: the larger of its Frechet
    distances as multiples of the floor's, under the choosing judges."""
    if floor["source"] != FLOORS["training"] or not set(CHOOSING_JUDGES) <= set(floor["judges"]):
        return None
    def multiple(row):
        return max(row["judges"][j]["frechet_distance"] / floor["judges"][j]["frechet_distance"]
                   for j in CHOOSING_JUDGES)
    passing = [row for row in samplers
               if all(row["judges"][j]["agreement"] >= AGREEMENT_TARGET for j in CHOOSING_JUDGES)]
    if not passing:
        return None
    chosen = min(passing, key=multiple)
    return {"sampler": chosen["source"], "multiple": multiple(chosen)}


def sampler_name(sampler, temperature, interval, top_k, top_p):
    return f"prior, guidance {scale_text(sampler['guidance_scale'])}, " \
        f"temperature {temperature:g}" + \
        (f", positions {interval[0]}-{interval[1] - 1}" if interval else "") + \
        (f", top-k {top_k}" if top_k else "") + (f", top-p {top_p:g}" if top_p < 1 else "") + \
        (f", keep {sampler['keep']:g}" if sampler["keep"] < 1 else "")


def prior_saw_the_reference(path):
    """Whether the prior trained on the reference images (trained before --hold-out, or with 0)."""
    return run_settings(load_checkpoint(path, "prior", "--prior-model")).get("hold_out", 0) == 0


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.floor_draws is not None and args.floor_from == "held-out":
        parser.error("--floor-draws: only with --floor-from training (the held-out images hold "
                     "one floor beside the reference)")
    args.floor_draws = args.floor_draws or FLOOR_DRAWS
    if args.floor_from == "held-out" and (args.num_samples or 0) > HOLD_OUT // 2:
        parser.error(f"--num-samples {args.num_samples}: at most {HOLD_OUT // 2:,} with "
                     f"--floor-from held-out (its {HOLD_OUT:,} images hold the reference and the "
                     f"floor)")
    args.num_samples = args.num_samples or (HOLD_OUT // 2 if args.floor_from == "held-out"
                                            else HOLD_OUT)
    device = resolve_device(args.device)
    vqvae, _ = load_vqvae(args.model, device, "--model", vqvae_sizes(args))
    prior = load_prior(args.prior_model, device, vqvae.codeBook.K, vqvae_path=args.model)
    # Every sampler checked before any data is read or drawn: a bad one stops the call at once
    samplers = {}   # name -> (sample_codes' options, temperature)
    for scale, keep, t in itertools.product(args.guidance_scales, args.keeps, args.temperatures):
        sampler = sampler_options(prior, args.prior_model, scale, args.top_k, args.top_p,
                                  args.guidance_interval, keep, ("--guidance-scales", "--keeps"))
        samplers[sampler_name(sampler, t, args.guidance_interval, args.top_k, args.top_p)] = \
            (sampler, t)
    seeds = list(dict.fromkeys(args.seeds))
    judges = {os.path.splitext(os.path.basename(path))[0]: load_classifier(path, device)
              for path in args.classifiers}
    train = MNISTSplit(args.data_folder, True, device)
    test = MNISTSplit(args.data_folder, False, device, limit=args.test_subset)
    held_out, draws = floor_indices(args.num_samples, args.floor_draws,
                                    args.floor_from)
    held_out, draws, n = held_out.to(device), [i.to(device) for i in draws], len(held_out)
    labels = train.labels[draws[0]]    # the floor's digits, in the training maps' class mix
    seeded = {(name, seed): name + (f", seed {seed}" if len(seeds) > 1 else "")
              for seed in seeds for name in samplers}
    with torch.no_grad():
        reference = reconstructions(vqvae, train.images[held_out])
        floors = [(reconstructions(vqvae, train.images[i]), train.labels[i]) for i in draws]
        sources = {FLOORS[args.floor_from]: floors[0]}
        if args.baselines:
            sources.update(baseline_sources(vqvae, train, n, device, seeds[0]))
        for (name, seed), source in seeded.items():
            sampler, t = samplers[name]
            torch.manual_seed(seed)
            sources[source] = (
                to_uint8(sample_prior(prior, vqvae, labels, temperature=t, **sampler)), labels)
        sources[REAL] = (train.images[draws[0]].unsqueeze(1), labels)
    # The floor's other draws judged in the same pass, so the reference's and the test images'
    # features are computed once per judge; their rows go into the floor's and are dropped
    other_draws = {("floor draw", i): floor for i, floor in enumerate(floors[1:], 1)}
    rows = judge_rows(judges, {**sources, **other_draws}, reference, test.images.unsqueeze(1))
    rows, other_rows = rows[:len(sources)], rows[len(sources):]
    at = next(i for i, row in enumerate(rows) if row["source"] == FLOORS[args.floor_from])
    rows[at] = mean_row(FLOORS[args.floor_from], [rows[at]] + other_rows)
    by_source = {row["source"]: row for row in rows}
    over_seeds = [mean_row(name, [by_source[seeded[name, seed]] for seed in seeds])
                  for name in samplers]
    report = {"reference": f"VQ-VAE reconstructions of training images {REFERENCE_START:,}.."
                           + (" (a random half)" if args.floor_from == "held-out" else ""),
              "prior_saw_the_reference": prior_saw_the_reference(args.prior_model),
              "floor": FLOORS[args.floor_from], "floor_draws": len(draws), "rows": rows,
              "seeds": seeds, "samplers": over_seeds,
              "protocol": protocol_choice(over_seeds, rows[at])}
    if args.json:
        print(json.dumps(report))
        return
    print_tables(report, list(judges))


def print_tables(report, judges):
    """One markdown table per judge, each figure beside the floor's (the Frechet distance also as
    a multiple of it), and the two-sample test; over several seeds, one table of each sampler's
    means; the protocol's choice."""
    floor = next(row for row in report["rows"] if row["source"] == report["floor"])
    print(f"reference: {report['reference']}" + (" (the prior trained on them)"
                                                  if report["prior_saw_the_reference"] else ""))
    print(f"{report['floor']}: the mean of {report['floor_draws']} draws; its two-sample "
          f"accuracy {100 * floor['two_sample_accuracy']:.1f} +- "
          f"{100 * floor['spread']['two_sample_accuracy']:.1f}%")
    for judge in judges:
        low, spread = floor["judges"][judge], floor["spread"]["judges"][judge]
        print(f"\n{judge}: figure (floor); the floor's Frechet distance "
              f"{low['frechet_distance']:.3f} +- {spread['frechet_distance']:.3f} over its draws")
        print("| source | agreement | Frechet (floor, multiple) | KID | precision | recall | "
              "Frechet to test | two-sample |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in report["rows"]:
            mine = row["judges"][judge]
            agreement = "—" if mine["agreement"] is None else f"{100 * mine['agreement']:.1f}%"
            print(f"| {row['source']} | {agreement} | {mine['frechet_distance']:.2f} "
                  f"({low['frechet_distance']:.2f}, "
                  f"{mine['frechet_distance'] / low['frechet_distance']:.2f}x) | "
                  f"{mine['kid']:.4f} ({low['kid']:.4f}) | "
                  f"{mine['precision']:.3f} ({low['precision']:.3f}) | {mine['recall']:.3f} "
                  f"({low['recall']:.3f}) | {mine['frechet_to_test']:.2f} | "
                  f"{100 * row['two_sample_accuracy']:.1f}% "
                  f"({100 * floor['two_sample_accuracy']:.1f}%) |")
    seeds = ", ".join(map(str, report["seeds"]))
    if len(report["seeds"]) > 1:
        print_over_seeds(report, judges, floor, seeds)
    rule = (f"agreement >= {100 * AGREEMENT_TARGET:g}% under each of {', '.join(CHOOSING_JUDGES)}, "
            f"then the lowest Frechet multiple, the larger of theirs; seeds {seeds}")
    choice = report["protocol"]
    print(f"\nprotocol ({rule}): " + (
        f"{choice['sampler']} ({choice['multiple']:.2f}x)" if choice else
        "no sampler chosen (none reaches the agreement, those judges did not all judge, or the "
        "floor is the held-out one, which takes no part in the choice)"))


def print_over_seeds(report, judges, floor, seeds):
    """Each sampler's means over the seeds (agreement and the two-sample test +- one seed's spread):
    agreement, the Frechet multiple and the Frechet distance to the test images under every judge
    (the test images took no part in choosing: a sampler with many knobs can fit the reference,
    RESULTS.md eleventh pass), recall under the first, the two-sample test."""
    to_test = " / ".join(f"{floor['judges'][j]['frechet_to_test']:.3f}" for j in judges)
    print(f"\nmeans over sampling seeds {seeds} (+- the spread of one seed); judges "
          f"{' / '.join(judges)}\n| sampler | agreement | Frechet (x the floor) | Frechet to test "
          f"(floor {to_test}) | recall ({judges[0]}; floor "
          f"{floor['judges'][judges[0]]['recall']:.3f}) | two-sample (floor "
          f"{100 * floor['two_sample_accuracy']:.1f}%) |\n| --- | --- | --- | --- | --- | --- |")
    for row in report["samplers"]:
        mine, spread = row["judges"], row["spread"]["judges"]
        agreement = " / ".join(f"{100 * mine[j]['agreement']:.2f} +- "
                               f"{100 * spread[j]['agreement']:.2f}" for j in judges)
        multiples = " / ".join(
            f"{mine[j]['frechet_distance'] / floor['judges'][j]['frechet_distance']:.2f}"
            for j in judges)
        to_test = " / ".join(f"{mine[j]['frechet_to_test']:.3f}" for j in judges)
        print(f"| {row['source']} | {agreement}% | {multiples} | {to_test} | "
              f"{mine[judges[0]]['recall']:.3f} | {100 * row['two_sample_accuracy']:.1f} +- "
              f"{100 * row['spread']['two_sample_accuracy']:.1f}% |")


if __name__ == "__main__":
    main()
