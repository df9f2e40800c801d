//! chDB (ClickHouse 26, in-process in Python) as a `SqlRunner`, so the same migrations and
//! queries run on current ClickHouse beside the 18.16 server.

use backends::error::StoreError;
use backends::store::clickhouse::SqlRunner;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

pub struct Chdb {
    io: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    child: Child,
    /// `SELECT version()` of the engine.
    pub version: String,
    _dir: tempfile::TempDir,
}

impl Chdb {
    /// Starts the runner with `database` as the current database.
    pub fn start(database: &str) -> Chdb {
        let python = super::test_python();
        let dir = tempfile::tempdir().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chdb/runner.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(dir.path())
            .arg(database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the chDB runner");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let hello: serde_json::Value = serde_json::from_str(&first)
            .unwrap_or_else(|_| panic!("chDB runner did not start (is chdb installed?): {first}"));
        Chdb {
            version: hello["tsv"].as_str().unwrap().trim().to_string(),
            io: Mutex::new((stdin, stdout)),
            child,
            _dir: dir,
        }
    }

    fn run(&self, sql: &str) -> Result<String, StoreError> {
        let mut io = self.io.lock().unwrap();
        let line = serde_json::json!({ "sql": sql }).to_string();
        writeln!(io.0, "{line}").unwrap();
        io.0.flush().unwrap();
        let mut answer = String::new();
        io.1.read_line(&mut answer).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        if answer["ok"] == true {
            Ok(answer["tsv"].as_str().unwrap().to_string())
        } else {
            Err(StoreError::BadAnswer {
                context: "chdb",
                detail: answer["error"].as_str().unwrap_or_default().to_string(),
            })
        }
    }
}

#[async_trait::async_trait]
impl SqlRunner for Chdb {
    async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.run(sql).map(|_| ())
    }

    async fn tab_separated(&self, sql: &str) -> Result<String, StoreError> {
        self.run(sql)
    }
}

impl Drop for Chdb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
