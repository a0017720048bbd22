#!/usr/bin/env python3
"""Lifeboat lab: credentials of the lab BMCs (run with the sushy-tools venv's python: needs bcrypt).

  auth.py init BMC_DIR HOST...   per host: a random password in HOST.cred (TOML, mode 0600, what
                                 the controller reads) and HOST.htpasswd (bcrypt, what the BMC checks)
  auth.py fix BMC_DIR HOST       HOST.htpasswd matches HOST.cred again
  auth.py break BMC_DIR HOST     HOST.htpasswd gets another, random password: HOST.cred is now wrong

sushy-emulator re-reads its htpasswd at every request: fix/break act at once, no restart.
bcrypt cost 4 (the minimum) keeps every request fast; this is a lab.
"""

import os
import re
import secrets
import string
import sys

import bcrypt

USER = "lifeboat"


def write(path, text, mode):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def random_password():
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


def htpasswd(bmc_dir, host, password):
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    write(os.path.join(bmc_dir, f"{host}.htpasswd"), f"{USER}:{h}\n", 0o600)


def read_cred(bmc_dir, host):
    with open(os.path.join(bmc_dir, f"{host}.cred")) as f:
        text = f.read()
    m = re.search(r'^password = "([^"]*)"', text, re.M)
    if not m:
        sys.exit(f"auth.py: no password in {bmc_dir}/{host}.cred")
    return m.group(1)


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("init", "fix", "break"):
        sys.exit(__doc__)
    cmd, bmc_dir, hosts = sys.argv[1], sys.argv[2], sys.argv[3:]
    for host in hosts:
        if cmd == "init":
            pw = random_password()
            write(
                os.path.join(bmc_dir, f"{host}.cred"),
                f'# Written by lab/lab.sh: the credentials of {host}\'s lab BMC.\nusername = "{USER}"\npassword = "{pw}"\n',
                0o600,
            )
            htpasswd(bmc_dir, host, pw)
        elif cmd == "fix":
            htpasswd(bmc_dir, host, read_cred(bmc_dir, host))
        else:
            htpasswd(bmc_dir, host, "broken-" + random_password())


if __name__ == "__main__":
    main()
