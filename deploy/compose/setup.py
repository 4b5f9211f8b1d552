"""Write the files docker-compose.yml needs that cannot be committed, once per deployment.

    python deploy/compose/setup.py        # from the repository root, with callout installed

- `deploy/compose/keys/issuer.nk`, `service.nk`, `xkey.nk`: the service's seeds, exactly what
  `callout keys generate --out deploy/compose/keys` writes (mode 0600). Compose mounts them as
  secrets.
- `deploy/compose/keys/admin.nk` (0600) and `admin.pub`: the first admin user, whom the compose
  `init` service adds to the users bucket. Give admin.nk to whoever administers APP.
- `deploy/cluster/keys.conf`: the public keys the three nats-server configs include.

It refuses to overwrite anything: keys are created once, then rotated by the steps in
the README's "Deploying" section. `--root` points at another checkout (the tests use a copy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from callout.commands.keys import KEY_FILES, generate_keys
from callout.keys import KeyKind, SigningKey, write_secret

ROOT = Path(__file__).resolve().parents[2]
KEYS_DIR = Path("deploy/compose/keys")
ADMIN_SEED = "admin.nk"
ADMIN_PUBLIC = "admin.pub"
KEYS_CONF = Path("deploy/cluster/keys.conf")


def keys_conf(issuer: str, xkey: str, service: str) -> str:
    q = json.dumps  # a JSON string is a valid nats-server config string
    return f"""\
# Public keys for deploy/cluster/nats-*.conf, written by deploy/compose/setup.py. No secrets.
# nats-server reads this file only when it starts: after an edit (a key rotation, see
# the README's "Deploying" section) restart the nodes one at a time.

# auth_callout.issuer: the public half of keys/issuer.nk (callout --issuer-seed-file).
CALLOUT_ISSUER: {q(issuer)}

# auth_callout.xkey: the public half of keys/xkey.nk (callout --xkey-seed-file).
CALLOUT_XKEY: {q(xkey)}

# The service's user key (keys/service.nk): an nkey user of the AUTH account, and exempt from
# the callout. While rotating the service's own nkey, list the old and the new key in both.
CALLOUT_SERVICE_USERS: [ {{ nkey: {q(service)} }} ]
CALLOUT_AUTH_USERS: [ {q(service)} ]
"""


def setup(root: Path) -> dict[str, str]:
    keys_dir = root / KEYS_DIR
    conf = root / KEYS_CONF
    taken = [p for p in (keys_dir / ADMIN_SEED, keys_dir / ADMIN_PUBLIC, conf) if p.exists()]
    taken += [keys_dir / name for name in KEY_FILES.values() if (keys_dir / name).exists()]
    if taken:
        raise SystemExit(
            "setup: refusing to overwrite "
            + ", ".join(str(p.relative_to(root)) for p in taken)
            + " (keys are generated once; rotate them as the README's Deploying section says)"
        )
    publics = generate_keys(keys_dir)
    admin = SigningKey.generate(KeyKind.USER)
    write_secret(keys_dir / ADMIN_SEED, admin.seed)
    (keys_dir / ADMIN_PUBLIC).write_text(admin.public + "\n")
    conf.write_text(keys_conf(publics["issuer"], publics["xkey"], publics["service"]))
    return {**publics, "admin": admin.public}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository checkout to write in")
    args = parser.parse_args(argv)
    publics = setup(args.root.resolve())
    sys.stdout.write(json.dumps(publics) + "\n")
    print(
        f"setup: wrote {KEYS_DIR}/ (seeds, mode 0600) and {KEYS_CONF}.\n"
        "The callout containers run as uid 10001: before `docker compose up`, either\n"
        f"  sudo chown 10001:10001 {' '.join(str(KEYS_DIR / n) for n in KEY_FILES.values())}\n"
        "or run them as yourself: export CALLOUT_UID=$(id -u) CALLOUT_GID=$(id -g)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
