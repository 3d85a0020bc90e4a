"""Entry point: python -m pipa_jax.main --config configs/synthetic.py[:method] --workdir DIR [--config.x=v]

Several hosts: run the same command on each, with --coordinator_address=HOST:PORT (process 0's
address) --num_processes=N --process_id=I, or with --distributed where JAX detects the cluster
(TPU pod slices, SLURM, Open MPI); see pipa_jax/distributed.py and the README."""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (with an optional ':variant').", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics.json. Resumes if it holds a run. "
                    "With several hosts, a directory every host reads and writes (shared file system or gs://).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0, which runs the coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes (one per host, or per GPU).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, 0..num_processes-1.")
flags.DEFINE_bool("distributed", False, "Multi-host with the cluster's own discovery (TPU pod slices, SLURM, "
                  "Open MPI): jax.distributed.initialize() fills in what the flags above leave out.")
flags.DEFINE_integer("initialization_timeout", 300, "Multi-host: seconds to wait for every process to join.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pipa_jax import distributed
    try:
        distributed.initialize(distributed.Setup(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                                 auto=FLAGS.distributed, timeout_s=FLAGS.initialization_timeout))
    except distributed.DistributedSetupError as e:
        raise SystemExit(f"pipa_jax.main: {e}") from None
    import jax

    from pipa_jax import train  # after flag parsing: keeps --help fast
    # Logs from process 0 only; the others report warnings and errors.
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    ev = result.get("eval", {}).get("student")
    if jax.process_index() == 0:
        print(f"done: step {result['step']}" + (f", target mIoU {ev['miou']:.4f}" if ev else ""))


if __name__ == "__main__":
    app.run(main)
