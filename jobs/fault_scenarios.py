"""The reliability fault scenarios: `python jobs/fault_scenarios.py --help`.

The runner is test code (tests/helpers/fault_scenarios.py, beside the fault-injecting modules it
uses and the tests that drive it); this is its command. Needs the `faults` extra (psutil, moto).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `pipeline` and `tests.helpers`

from tests.helpers.fault_scenarios import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
