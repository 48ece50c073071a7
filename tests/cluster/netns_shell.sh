#!/usr/bin/env bash
# Stands in for ssh in the two-node tests: `netns_shell.sh HOST CMD` runs CMD in HOST's network namespace,
# through the same code path (alignment.cluster.launch) that runs `ssh HOST CMD`. ALIGN_TEST_NETNS maps
# host addresses to namespaces: "10.231.7.1=ns0,10.231.7.2=ns1".
set -euo pipefail
host=$1; shift
for entry in ${ALIGN_TEST_NETNS//,/ }; do
  if [[ "${entry%%=*}" == "$host" ]]; then exec ip netns exec "${entry#*=}" bash -c "$*"; fi
done
echo "netns_shell.sh: no namespace for host $host in ALIGN_TEST_NETNS=$ALIGN_TEST_NETNS" >&2
exit 255
