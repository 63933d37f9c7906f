//! `.parquet` data: a `text` column (strings) or a `messages` column (list of {role, content}
//! structs, as chat datasets store it, or JSON strings), read in record batches.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::data::document::{DocStream, Document, messages_from_json};
use crate::model::tokenizer::Message;

pub fn open(path: &Path) -> Result<DocStream> {
    let file = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let schema = builder.schema().clone();
    let (index, column) = ["text", "messages"]
        .iter()
        .find_map(|name| schema.index_of(name).ok().map(|i| (i, *name)))
        .ok_or_else(|| anyhow!("{}: no `text` or `messages` column", path.display()))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader =
        builder.with_projection(mask).with_batch_size(1024).build().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Box::new(ParquetDocs { reader, path: path.to_path_buf(), column, queue: VecDeque::new(), row: 0 }))
}

struct ParquetDocs {
    reader: ParquetRecordBatchReader,
    path: PathBuf,
    column: &'static str,
    queue: VecDeque<Document>,
    row: usize,
}

impl ParquetDocs {
    fn decode(&mut self, batch: &RecordBatch) -> Result<()> {
        let col = batch.column(0);
        let at = |row: usize| format!("{}: row {row}, column `{}`", self.path.display(), self.column);
        for i in 0..col.len() {
            let row = self.row + i;
            if col.is_null(i) {
                continue;
            }
            let doc = match (self.column, col.data_type()) {
                ("text", DataType::Utf8) => Document::Text(col.as_string::<i32>().value(i).to_string()),
                ("text", DataType::LargeUtf8) => Document::Text(col.as_string::<i64>().value(i).to_string()),
                ("text", DataType::Utf8View) => Document::Text(col.as_string_view().value(i).to_string()),
                ("messages", DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
                    let s = match col.data_type() {
                        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
                        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
                        _ => col.as_string_view().value(i).to_string(),
                    };
                    let v: serde_json::Value =
                        serde_json::from_str(&s).map_err(|e| anyhow!("{}: not valid JSON: {e}", at(row)))?;
                    Document::Chat(messages_from_json(&v).map_err(|e| anyhow!("{}: {e}", at(row)))?)
                }
                ("messages", DataType::List(_)) => Document::Chat(
                    struct_messages(col.as_list::<i32>().value(i).as_ref()).map_err(|e| anyhow!("{}: {e}", at(row)))?,
                ),
                ("messages", DataType::LargeList(_)) => Document::Chat(
                    struct_messages(col.as_list::<i64>().value(i).as_ref()).map_err(|e| anyhow!("{}: {e}", at(row)))?,
                ),
                (_, other) => bail!("{}: unsupported column type {other}", at(row)),
            };
            self.queue.push_back(doc);
        }
        self.row += col.len();
        Ok(())
    }
}

/// A list element: struct array with string fields `role` and `content`.
fn struct_messages(turns: &dyn Array) -> Result<Vec<Message>> {
    let s = turns.as_struct_opt().ok_or_else(|| anyhow!("`messages` items are not structs"))?;
    let field = |name: &str| -> Result<Vec<String>> {
        let c = s.column_by_name(name).ok_or_else(|| anyhow!("`messages` items have no `{name}` field"))?;
        Ok(match c.data_type() {
            DataType::Utf8 => c.as_string::<i32>().iter().map(|v| v.unwrap_or("").to_string()).collect(),
            DataType::LargeUtf8 => c.as_string::<i64>().iter().map(|v| v.unwrap_or("").to_string()).collect(),
            DataType::Utf8View => c.as_string_view().iter().map(|v| v.unwrap_or("").to_string()).collect(),
            other => bail!("`messages.{name}` has type {other}, expected a string"),
        })
    };
    if s.is_empty() {
        bail!("{}", crate::data::document::EMPTY_MESSAGES);
    }
    let (roles, contents) = (field("role")?, field("content")?);
    Ok(roles.into_iter().zip(contents).map(|(role, content)| Message { role, content }).collect())
}

impl Iterator for ParquetDocs {
    type Item = Result<Document>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Some(Ok(d));
            }
            match self.reader.next()? {
                Ok(batch) => {
                    if let Err(e) = self.decode(&batch) {
                        return Some(Err(e));
                    }
                }
                Err(e) => return Some(Err(anyhow!("{}: read failed: {e}", self.path.display()))),
            }
        }
    }
}
