"""Make this machine a cluster-launcher node on 127.0.0.1, for deploy/local-cluster.yaml.

Ray's local node provider reaches every node over SSH. `up` starts an sshd of its own on a free
loopback port (own host key, own authorized key, no PAM), whose sessions get a private HOME with a
`.bashrc` that holds what a node needs: this Python on PATH, Ray kept on loopback, the node's Ray
ports, a private Ray temp dir and tmux socket, and a scope id (PAGEDRAY_RAY_SCOPE) with
`deploy/local/bin/ray` first on PATH, so that the `ray stop` run by `ray down` stops this
cluster's processes only (scoped_ray.py) and not other Ray users' on the same host.

    eval "$(python deploy/local/node.py up)"        # prints the exports for `ray up` / `ray submit`
    ray up -y deploy/local-cluster.yaml ...
    python deploy/local/node.py down "$PAGEDRAY_LOCAL_NODE"
"""
from __future__ import annotations

import argparse
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scoped_ray  # noqa: E402

KEY_IN_HOME = ".ssh/pagedray-local"   # deploy/local-cluster.yaml names this key, as ~/.ssh/pagedray-local
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_port_args(gcs_port: int | None = None) -> list[str]:
    """`ray start --head` flags that move every listener off Ray's fixed defaults (which collide
    between clusters on one host) and leave the dashboard out."""
    gcs, client, agent, agent_grpc, env_agent, metrics, node_manager, object_manager = free_ports(8)
    return [f"--port={gcs_port or gcs}", "--include-dashboard=false", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}"]


def _key_paths() -> list[Path]:
    """Where the YAML's `~/.ssh/pagedray-local` is read. Ray reads the key itself through $HOME
    (os.path.expanduser: the config hash, the head's bootstrap key) but hands `ssh -i` the path
    unexpanded, and ssh takes `~` from the password database. One path, unless $HOME was changed
    (`env -i HOME=...`, a CI job's HOME): then both keys must open the node's sshd."""
    homes = [Path.home(), Path(pwd.getpwuid(os.getuid()).pw_dir)]
    return list(dict.fromkeys(home / KEY_IN_HOME for home in homes))


def _ensure_key(key: Path) -> None:
    if key.exists():
        return
    key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = key.with_name(f"{key.name}.{os.getpid()}")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp)], check=True)
    os.replace(f"{tmp}.pub", f"{key}.pub")
    os.replace(tmp, key)   # last: a present key always has its .pub


def up(num_cpus: int | None) -> dict[str, str]:
    scope = uuid.uuid4().hex[:10]
    node = Path(f"/tmp/prl-{scope}")   # short: Ray's socket paths live under it
    home = node / "home"
    home.mkdir(parents=True)
    keys = _key_paths()
    for key in keys:
        _ensure_key(key)
    (node / "authorized_keys").write_text("".join(Path(f"{key}.pub").read_text().strip() + "\n" for key in keys))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(node / "host_key")], check=True)
    ssh_port, = free_ports(1)
    gcs, = free_ports(1)
    head_args = " ".join(head_port_args(gcs) + ([f"--num-cpus={num_cpus}"] if num_cpus is not None else []))
    env = {**LOOPBACK, scoped_ray.SCOPE_VAR: scope, "RAY_TMPDIR": str(node / "t"), "TMUX_TMPDIR": str(node),
           "RAY_ADDRESS": f"127.0.0.1:{gcs}", "PAGEDRAY_RAY_HEAD_ARGS": head_args}
    (node / "t").mkdir()
    path = f"{HERE / 'bin'}:{Path(sys.executable).parent}"
    (home / ".bashrc").write_text(f"export PATH={path}:$PATH\n" + "".join(
        f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    (node / "sshd_config").write_text(f"""Port {ssh_port}
ListenAddress 127.0.0.1
HostKey {node / 'host_key'}
AuthorizedKeysFile {node / 'authorized_keys'}
PidFile {node / 'sshd.pid'}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
SetEnv HOME={home}
""")
    Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation directory
    subprocess.run(["/usr/sbin/sshd", "-f", str(node / "sshd_config")], check=True)
    return {"PAGEDRAY_SSH_PORT": str(ssh_port), "PAGEDRAY_LOCAL_NODE": str(node),
            scoped_ray.SCOPE_VAR + "_OF_NODE": scope}


def down(node: Path) -> list[int]:
    """Stop the node's Ray scope (whatever `ray down` left) and its sshd; remove its folder."""
    pids = []
    bashrc = (node / "home" / ".bashrc").read_text()
    scope = next(line.split("=", 1)[1] for line in bashrc.splitlines()
                 if line.startswith(f"export {scoped_ray.SCOPE_VAR}="))
    pids += scoped_ray.stop(scope)
    pid_file = node / "sshd.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except ProcessLookupError:
            pass
    subprocess.run(["rm", "-rf", str(node)], check=False)
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="start the node's sshd; print the exports for the ray CLI")
    p.add_argument("--num-cpus", type=int, help="CPUs the head's Ray advertises (default: detected)")
    p = sub.add_parser("down", help="stop the node's processes and sshd")
    p.add_argument("node", type=Path)
    args = parser.parse_args()
    if args.cmd == "up":
        for k, v in up(args.num_cpus).items():
            print(f"export {k}={shlex.quote(v)}")
    else:
        down(args.node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
