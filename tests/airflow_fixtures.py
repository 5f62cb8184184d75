"""An isolated Airflow for the DAG tests: AIRFLOW_HOME in a temporary directory (set on import, so
before airflow is imported anywhere), DAGs from the repository's dags/, examples off, and a session
fixture ``airflow_db`` that migrates the sqlite metadata DB once (dag.test() needs its tables).

Imported by ``conftest.py``; self-contained so it merges beside other fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DAGS = Path(__file__).parents[1] / "dags"
_HOME = tempfile.mkdtemp(prefix="tcapguard-airflow-home-")
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ.pop("AIRFLOW_VAR_TCAPGUARD_MODE", None)  # the DAG's mode comes from each test's conf


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """AIRFLOW_HOME, with its metadata DB migrated (about 4 s)."""
    airflow = Path(sys.executable).with_name("airflow")
    done = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(_HOME)
