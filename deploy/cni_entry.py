"""PyInstaller entry for the tortie CNI binary (deploy/build-cni.sh).

The clock is read before anything else is imported, so the binary's debug "timing" log
line can tell the interpreter's start-up from the plugin's imports."""
import time

_ENTRY = time.monotonic()

from cni_plugin.main import main  # noqa: E402  (after the clock, on purpose)

if __name__ == "__main__":
    main(_ENTRY)
