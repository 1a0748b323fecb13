"""`accelerate launch` for the multi-process tests: two CPU processes (gloo), each launch with its
own free rendezvous port, so that tests running at once (`pytest -n 2`) do not meet on 29500."""

import socket
import sys


def accelerate() -> list[str]:
    """The launcher command, ready for `-m patronus ...` or a script path."""
    with socket.socket() as s:  # the OS picks a port free now; the launcher binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]
