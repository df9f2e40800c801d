"""Runs SQL on chDB (current ClickHouse, in-process) for the Rust tests.

Usage: runner.py DATA_DIR DATABASE
Reads one JSON object per line on stdin, {"sql": "..."}, runs it in a chDB session whose
current database is DATABASE, and answers one JSON line: {"ok": true, "tsv": "..."} with the
TabSeparated answer, or {"ok": false, "error": "..."}.
"""

import json
import sys

from chdb import session


def main(data_dir: str, database: str) -> None:
    s = session.Session(data_dir)
    s.query(f"CREATE DATABASE IF NOT EXISTS {database}")
    s.query(f"USE {database}")
    print(json.dumps({"ok": True, "tsv": s.query("SELECT version()", "TabSeparated").bytes().decode()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = s.query(request["sql"], "TabSeparated")
            text = answer.bytes().decode() if answer is not None else ""
            print(json.dumps({"ok": True, "tsv": text}), flush=True)
        except Exception as e:  # the error text goes back to the test, which fails on it
            print(json.dumps({"ok": False, "error": str(e)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
