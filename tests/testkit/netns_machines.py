"""Machines for Ray's cluster launcher on one host: network namespaces (netns_cluster.Namespaces), each
with its own sshd on port 22 and a home of its own.

The home is a folder bind-mounted over /root in a mount namespace of the node, which its sshd and
everything started through it (Ray, the driver, tmux) share: `~/ray_bootstrap_key.pem`, which the
head's autoscaler hands to `ssh -i` unexpanded (ssh expands `~` from the password database, not
$HOME), then lands in that node's own home, as on a real machine. Likewise each node's Ray temp dir: a
worker's `ray start --address` takes the head's temp-dir path (from the GCS) as its own, so all nodes use
one path, `<tmp>/ray-tmp`, over which each node's mount namespace binds a folder of its own; were it one
shared folder, workers starting together would race for the same session socket names (both raylets on
`sockets/raylet.1`) and one `ray start` would time out. Each node's `~/.bashrc` puts
deploy/local/bin (whose `ray stop` stops only this node's scope) and this venv first on PATH.
Node 0 is the "laptop" that runs `ray up`; the others get the addresses of deploy/local-multinode.yaml.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

from testkit.netns_cluster import REPO, Namespaces, Node, _ip  # noqa: F401

# What under this host's /root a node must still see: the interpreter the venv links to.
_ROOT_KEEP = sorted({Path(sys.base_prefix).relative_to("/root").parts[0]}
                    if Path(sys.base_prefix).is_relative_to("/root") else set())
KEY_NAME = "pagedray-cluster"     # deploy/local-multinode.yaml's auth.ssh_private_key, in the laptop's ~/.ssh


class SshMachines(Namespaces):
    def __init__(self, count: int) -> None:
        super().__init__([(0, {})] * count, first=9)     # the laptop at .9, the head at .10, workers after
        self.scopes = {node.name: f"m{uuid.uuid4().hex[:10]}" for node in self.nodes}

    @property
    def laptop(self) -> Node:
        return self.nodes[0]

    @property
    def cluster_nodes(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def ray_tmp(self) -> Path:
        """RAY_TMPDIR on every node: the same path, a different folder on each (see the module doc)."""
        return self.tmp / "ray-tmp"

    def home(self, node: Node) -> Path:
        return self.tmp / node.name / "home"

    def _exec(self, node: Node, argv: list[str]) -> list[str]:
        """Run in the node's namespace with its home mounted over /root; what this host keeps under /root
        that the node needs (the Python the venv links to, e.g. ~/.pyenv) is mounted into it first."""
        home = shlex.quote(str(self.home(node)))
        keep = "".join(f"mkdir -p {home}/{name} && mount --bind /root/{name} {home}/{name} && "
                       for name in _ROOT_KEEP)
        own_tmp = shlex.quote(str(self.tmp / node.name / "t"))
        mount = (f"{keep}mount --rbind {home} /root && mount --bind {own_tmp} {shlex.quote(str(self.ray_tmp))} "
                 f"&& exec \"$@\"")
        return ["ip", "netns", "exec", node.name, "unshare", "-m", "--propagation", "private",
                "sh", "-c", mount, "sh", *argv]

    def _write_node(self, node: Node, key: Path) -> None:
        folder = self.tmp / node.name
        home = self.home(node)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (folder / "t").mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
        env = {"PAGEDRAY_RAY_SCOPE": self.scopes[node.name], "RAY_TMPDIR": str(self.ray_tmp),
               "TMUX_TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "OMP_NUM_THREADS": "1", "HOME": "/root"}
        path = f"{REPO / 'deploy' / 'local' / 'bin'}:{Path(sys.executable).parent}"
        (home / ".bashrc").write_text(f"export PATH={path}:$PATH\nunset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER\n" +
                                      "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        (folder / "sshd_config").write_text(f"""Port 22
ListenAddress {node.ip}
HostKey {folder / 'host_key'}
AuthorizedKeysFile {self.tmp / 'authorized_keys'}
PidFile {folder / 'sshd.pid'}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
""")
        if node is self.laptop:
            (home / ".ssh" / KEY_NAME).write_bytes(key.read_bytes())
            (home / ".ssh" / KEY_NAME).chmod(0o600)

    def start(self) -> "SshMachines":
        super().start()
        try:
            key = self.tmp / "key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            self.ray_tmp.mkdir()
            (self.tmp / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
            Path("/run/sshd").mkdir(exist_ok=True)     # sshd's privilege-separation directory
            for node in self.nodes:
                self._write_node(node, key)
                if node is not self.laptop:
                    subprocess.run(self._exec(node, ["/usr/sbin/sshd", "-f", str(self.tmp / node.name / "sshd_config")]),
                                   check=True, timeout=30)
        except BaseException:
            self.shutdown()
            raise
        return self

    def sshd_pids(self, node: Node) -> set[int]:
        """The node's sshd and its session processes (not the cluster's)."""
        out = set()
        for pid in self.pids(node):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("sshd"):
                out.add(pid)
        return out

    def leftovers(self, node: Node) -> dict[int, str]:
        """What runs on `node` besides its sshd: pid -> command line."""
        left = {}
        for pid in set(self.pids(node)) - self.sshd_pids(node):
            try:
                left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                continue
        return left

    def laptop_run(self, argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
        """A command on the laptop, in a login-like environment (its ~/.bashrc's PATH and variables)."""
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
        script = f"source /root/.bashrc; {exports}cd {shlex.quote(str(REPO))} && exec {shlex.join(argv)}"
        return subprocess.run(self._exec(self.laptop, ["bash", "-c", script]), capture_output=True, text=True,
                              timeout=timeout, env=self.env())
