"""Many processes: keras-tuner's own distributed mode, with tlkit's runs.

The chief (KERASTUNER_TUNER_ID=chief) serves the oracle over gRPC at KERASTUNER_ORACLE_IP:
KERASTUNER_ORACLE_PORT; workers (tuner0, tuner1, ...) ask it for trials and run them. `workers=N`
makes this process the chief and starts N workers beside it, after computing the features, which
the workers then read from the cache. A worker nests its trial runs under the parent run named by
TLKIT_PARENT_RUN_ID. Machines share only the oracle and the tracking server (its artifact store too).

keras-tuner has no public server API: `keras_tuner.src.distribute.oracle_chief` (its servicer and
exit rule) and `keras_tuner.src.protos` (the gRPC service) are used as keras-tuner's own chief uses
them (guarded by tests/test_private_apis.py; keras-tuner bounded below 1.5).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from tlkit.spec import SpecError, flag
from tlkit.tune.errors import TuneError


log = logging.getLogger(__name__)

PARENT_ENV = "TLKIT_PARENT_RUN_ID"  # the parent run a worker nests its trial runs under
POLL_SECONDS = 0.5  # how often the chief checks whether the search is over (keras-tuner's loop: 20 s)


def role() -> str:
    """'single' (one process), 'chief' (serves the oracle) or 'worker': keras-tuner's variables decide."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"

    for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(name):
            raise SpecError(f"KERASTUNER_ORACLE_IP is set but {name} is not: a distributed search needs both")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"

def spec_arguments(spec: dict, searched) -> list[str]:
    """The spec as `tlkit tune` options, less the `searched` fields (which it refuses): how the
    chief starts its workers with the same search."""
    out = []
    for name, value in spec.items():
        if name in searched:
            continue
        if isinstance(value, bool):
            out.append(flag(name) if value else flag(name).replace("--", "--no-", 1))
        else:
            out += [flag(name), str(value)]
    return out


def _oracle_address() -> tuple[str, str]:
    """Where the chief listens: keras-tuner's variables, else a free port on this machine only."""
    import socket

    if role() == "chief":
        return os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", str(s.getsockname()[1])


def run_chief(tuner, spec: dict, search, variant: str, folder: Path, parent: str, *, workers: int,
              cache_dir: str | None) -> None:
    """Serve the oracle of `tuner` (a tracked keras-tuner Tuner) until the search is over, with
    `workers` worker processes started here on the same variant, spec and search settings."""
    import mlflow

    ip, port = _oracle_address()
    tuner.save()
    command = [sys.executable, "-m", "tlkit.cli", "tune", variant, *spec_arguments(spec, search.space),
               "--tuner", search.tuner, "--max-trials", str(search.max_trials),
               "--executions-per-trial", str(search.executions_per_trial), "--search-dir", str(folder)]
    if cache_dir:
        command += ["--cache-dir", str(cache_dir)]
    connect = "127.0.0.1" if ip in ("0.0.0.0", "::", "[::]") else ip
    env = dict(os.environ, KERASTUNER_ORACLE_IP=connect, KERASTUNER_ORACLE_PORT=port, **{PARENT_ENV: parent},
               MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env.pop("MLFLOW_RUN_ID", None)  # the project's run is the parent, not a worker's run
    logs = folder / "logs"
    if workers:
        logs.mkdir(parents=True, exist_ok=True)
    processes = []
    # Workers first, then the server: gRPC's threads should not be running when this process forks.
    for i in range(workers):
        path = logs / f"tuner{i}.log"
        with open(path, "ab") as out:
            processes.append((f"tuner{i}", path, subprocess.Popen(
                command, env={**env, "KERASTUNER_TUNER_ID": f"tuner{i}"}, stdout=out, stderr=subprocess.STDOUT)))
    log.info("oracle at %s:%s, parent run %s; %d worker(s) here%s", ip, port, parent, workers,
             f", logs in {logs}" if workers else "")
    log.info("more workers, on any machine that reaches the oracle and the tracking server: "
             "MLFLOW_TRACKING_URI=<tracking server> %s=%s KERASTUNER_ORACLE_IP=<this machine> "
             "KERASTUNER_ORACLE_PORT=%s KERASTUNER_TUNER_ID=tuner<K> tlkit tune <the same options>",
             PARENT_ENV, parent, port)
    try:
        _serve(tuner.oracle, f"{ip}:{port}", [p for _, _, p in processes])
        codes = [(name, path, process.wait()) for name, path, process in processes]
    except BaseException:
        for _, _, process in processes:
            if process.poll() is None:
                process.terminate()  # SIGTERM: the worker marks its trial run KILLED and exits
        for _, _, process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    # keras-tuner saves the oracle before it forgets the last ongoing trial, and only a worker (which
    # saves no oracle) ends trials here: save the end state, or a resume would run that trial again.
    tuner.save()
    for name, path, code in codes:
        log.info("worker %s exited with %d", name, code)
        if code != 0:
            tail = path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise TuneError(f"worker {name} exited with {code} ({tail[0][:200]}); its log: {path}")


def _serve(oracle, address: str, local_workers: list) -> None:
    """keras-tuner's chief server (oracle_chief.start_server) with its stopping rule changed.

    keras-tuner stops once some worker was told "no more trials" while no trial runs and no other
    worker has asked: on a search that is (nearly) done, a worker still importing TensorFlow has not
    asked yet, and then waits an hour for a server that is gone. So while a worker started here runs,
    we serve; once all have exited, one that failed ends it (its trial would never end), else
    keras-tuner's rule does (for workers elsewhere). And it is over within POLL_SECONDS, not 20 s.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise TuneError(f"cannot serve the oracle on {address}: is the port in use?")
    server.start()
    try:
        while True:
            time.sleep(POLL_SECONDS)
            codes = [p.poll() for p in local_workers]
            if None in codes:
                continue
            if any(codes) or (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
                return
    finally:
        server.stop(grace=2)
