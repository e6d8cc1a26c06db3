#!/bin/sh
# One entrypoint for the image and for `make serve`: the same script starts the service both ways.
#   entrypoint.sh serve [--model NAME]     (default) the API server
#   entrypoint.sh train [flags]            the training entrypoint (writes into the model store)
#   entrypoint.sh evaluate [flags]         held-out evaluation
#   entrypoint.sh fetch-assets             fetch + convert the embedded default
#   entrypoint.sh <any command>            run it as is
set -eu
cmd="${1:-serve}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
  serve)        exec hellaswag-serve "$@" ;;
  train)        exec hellaswag-train "$@" ;;
  evaluate)     exec hellaswag-evaluate "$@" ;;
  fetch-assets) exec hellaswag-fetch-assets "$@" ;;
  *)            exec "$cmd" "$@" ;;
esac
