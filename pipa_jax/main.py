"""Entry point: python -m pipa_jax.main --config configs/synthetic.py[:method] --workdir DIR [--config.x=v]"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (with an optional ':variant').", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.json. Resumes if it holds a run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pipa_jax import train  # after flag parsing: keeps --help fast
    logging.set_verbosity(logging.INFO)
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    ev = result.get("eval", {}).get("student")
    print(f"done: step {result['step']}" + (f", target mIoU {ev['miou']:.4f}" if ev else ""))


if __name__ == "__main__":
    app.run(main)
