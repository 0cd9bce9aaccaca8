"""Every loss balancer on one multi-task problem: the table multi-task papers report.

    python scripts/benchmark_balancers.py                # every balancer, 3 seeds; see below
    python scripts/benchmark_balancers.py --balancers=sum,pcgrad,mgda --seeds=0,1,2,3,4
    python scripts/benchmark_balancers.py --quick        # a tiny run that checks the script

The problem (`termwise.models.multitask`): scikit-learn's bundled 8x8 digits, each rotated by
its own random angle in [-45, 45] degrees (a fixed seed). A shared encoder with one head per
task learns three terms: `classification` (10 classes), `reconstruction` (the image) and
`rotation` (the angle). Each balancer (and the plain sum, `sum`) trains it once per seed; the
same network trained on each task alone gives the single-task baselines. The table shows each
task's held-out metric (accuracy, per-pixel MSE, mean absolute angle error in degrees) as the
mean ± standard deviation over the seeds, the mean relative drop against the single-task
baselines (Delta_m, Maninis et al. 2019; positive is worse), and the median step time over the
plain sum's. Each gradient-based balancer also runs with `@layer=shared`: its Gramian over the
last shared layer only (the update still uses the full per-term gradients).

It writes the table as Markdown (--markdown) and CSV (--csv), one progress line per run on
standard output. A run that fails (a term stops being finite, a balancer's precondition) is
listed under the table with its seed, step and message; the others go on.
"""

import os
import shlex
import sys
import time

import common
import tensorflow as tf
from absl import flags, logging

from termwise.models import multitask
from termwise.models.config import ConfigError

QUICK = {"seeds": ["0"], "steps": 20, "steps_per_execution": 10}

flags.DEFINE_list(
    "balancers",
    list(multitask.balancer_names()),
    "Balancers to compare, as --balancer takes them (sum: the plain sum, which must be "
    "among them).",
)
flags.DEFINE_string(
    "layer",
    multitask.LAST_SHARED_LAYER,
    "Also run each gradient-based balancer with its Gramian over this layer's variables "
    "(`@layer=`); empty: don't.",
)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (initial weights, data order).")
flags.DEFINE_integer("steps", 1000, "Training steps of every run.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer(
    "steps_per_execution", 100, "Steps per compiled call; the first call of a run is not timed."
)
flags.DEFINE_string("out_dir", "runs/benchmark_balancers", "Where the table files go.")
flags.DEFINE_string("markdown", "", "The Markdown table's path (default: OUT_DIR/balancers.md).")
flags.DEFINE_string("csv", "", "The CSV table's path (default: OUT_DIR/balancers.csv).")
flags.DEFINE_boolean(
    "quick",
    False,
    "A tiny run that checks the script, not the balancers: "
    + ", ".join(f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in QUICK.items())
    + " (flags given explicitly keep their values).",
)
FLAGS = flags.FLAGS


def main():
    if FLAGS.quick:
        for name, value in QUICK.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
    logging.set_verbosity(logging.WARNING)
    # Each run builds its own Trainer, so TensorFlow warns that its functions retrace.
    tf.get_logger().setLevel("ERROR")
    try:
        seeds = [int(seed) for seed in FLAGS.seeds]
    except ValueError:
        raise ConfigError(f"--seeds ({','.join(FLAGS.seeds)}) must be integers.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds ({','.join(FLAGS.seeds)}) must be distinct integers.")
    for name in ("steps", "batch_size", "steps_per_execution"):
        if FLAGS[name].value <= 0:
            raise ConfigError(f"--{name} ({FLAGS[name].value}) must be a positive integer.")
    if FLAGS.steps < 2 * FLAGS.steps_per_execution:
        raise ConfigError(
            f"--steps ({FLAGS.steps}) must be at least twice --steps_per_execution "
            f"({FLAGS.steps_per_execution}): the first call of each run is not timed."
        )
    try:
        methods = multitask.plan(FLAGS.balancers, layer=FLAGS.layer or None)
    except ValueError as error:
        flag = "--layer" if str(error).startswith("`layer`") else "--balancers"
        raise ConfigError(f"{flag}: {error}") from None
    markdown = FLAGS.markdown or os.path.join(FLAGS.out_dir, "balancers.md")
    csv_path = FLAGS.csv or os.path.join(FLAGS.out_dir, "balancers.csv")
    for path in (markdown, csv_path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    load = os.getloadavg()[0]
    start = time.perf_counter()
    train, test = multitask.load_data()
    runs = multitask.run_benchmark(
        methods,
        seeds=seeds,
        steps=FLAGS.steps,
        train=train,
        test=test,
        report=lambda line: print(line, flush=True),
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        steps_per_execution=FLAGS.steps_per_execution,
    )
    minutes = (time.perf_counter() - start) / 60
    command = shlex.join(["python", "scripts/benchmark_balancers.py", *sys.argv[1:]])
    notes = [
        f"`{command}`: {len(runs)} runs of {FLAGS.steps} steps in {minutes:.1f} min on "
        f"{os.cpu_count()} CPUs (load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end); {len(train.labels)} training and "
        f"{len(test.labels)} held-out digits.",
    ]
    rows = multitask.summarize(runs)
    with open(markdown, "w") as handle:
        handle.write(multitask.markdown_table(rows, notes=notes))
    multitask.write_csv(rows, csv_path)
    print(multitask.markdown_table(rows, notes=notes), end="")
    print(f"Markdown: {markdown}\nCSV: {csv_path}")


if __name__ == "__main__":
    common.run(main)
