"""The runtime every job stands on: typed job configs (YAML in, flags on top), the error types and their
exit status, secret redaction, console progress, and the Ray runtime (starting or joining a cluster,
actor pools, quiet driver output). It imports nothing else of vaepipe: every other subpackage may
import it."""
