# Sourced by the scripts beside it: a vhost and a Redis key prefix of their
# own with fresh secrets, so a run touches nothing else, and their removal.
#
#   sandbox_up NAME   vhost mailroom-NAME (made anew), key prefix NAME<pid>:,
#                     a fresh redis.hash_key and sealing key, all exported
#   sandbox_down      deletes the vhost and the prefix's Redis keys
#                     (KEEP=1 keeps the keys, to look at them)

sandbox_up() {
  VHOST=mailroom-$1
  rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
  rabbitmqctl -q add_vhost "$VHOST" && rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' || exit 2
  export MAILROOM__AMQP__URLS="amqp://guest:guest@127.0.0.1:5672/$VHOST"
  SANDBOX_PREFIX="$1$$:"
  export MAILROOM__REDIS__KEY_PREFIX=$SANDBOX_PREFIX
  export MAILROOM__REDIS__HASH_KEY=$(head -c 32 /dev/urandom | base64)
  export MAILROOM__SEAL__KEYS="$1:$(head -c 32 /dev/urandom | base64)"
}

sandbox_down() {
  # Nothing to remove before sandbox_up (an early exit); above all, never
  # scan with an empty prefix.
  [ -n "${SANDBOX_PREFIX:-}" ] || return 0
  rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1
  [ -n "${KEEP:-}" ] || redis-cli --scan --pattern "$SANDBOX_PREFIX*" | xargs -r redis-cli del >/dev/null
}
