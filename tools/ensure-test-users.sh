#!/usr/bin/env bash
# Make sure the users and groups that pjdfstest's configuration names exist
# (../shared/conformance/pjdfstest.toml: nobody/nogroup and tests/tests). Needs root.
set -euo pipefail

have_group() { getent group "$1" >/dev/null; }
have_user() { getent passwd "$1" >/dev/null; }
nologin=$(command -v nologin || echo /usr/sbin/nologin)

have_group nogroup || groupadd --system nogroup
have_user nobody || useradd --system -M -d /nonexistent -s "$nologin" -g nogroup nobody
have_group tests || groupadd tests
have_user tests || useradd -M -d /nonexistent -s "$nologin" -g tests tests
