import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The lab's helper processes (nsproxy) run with the same interpreter as the tests.
os.environ.setdefault("TORTIE_PYTHON", sys.executable)

pytest_plugins = ["tests.lab.plugin"]
