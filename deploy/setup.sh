#!/usr/bin/env bash
# Sets up a Debian 12 machine for branchpbx: Debian packages, a virtualenv in .venv, and
# branchpbx with its test tools installed into it. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc          # Python and what wheels without binaries need
    iproute2 iptables conntrack procps psmisc     # the NAT lab (network namespaces, real NAT)
    sip-tester baresip-core sipvicious tshark     # real SIP peers and captures for the tests
)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.branchpbx-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    echo "setup: installing branchpbx and its Python packages into .venv"
    log=$(mktemp)
    if ! { .venv/bin/python -m pip install -q --upgrade pip \
           && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup: pip install failed (output above)" >&2
        exit 1
    fi
    rm -f "$log"
    rm -f .venv/.branchpbx-* && touch "$stamp"
fi
