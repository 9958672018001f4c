//! [`FileLog`]: the proxy's replay logs on disk, crash-safe (`tidemark proxy
//! --log DIR`). Its documentation describes the directory, the format,
//! recovery and compaction.

use super::storage::{LogOp, LogStorage, StoredStream, StreamKind, StreamMeta, TokenMap};
use crate::file_store::replace_durably;
use crate::private::{private_dir, private_file};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tidemark_core::Millis;
use tidemark_core::replay::{Identity, LogRecord, StreamToken};

const MAGIC: &[u8; 12] = b"tidemark log";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 16;
const FRAME_LEN: usize = 8;
const LOCK: &str = "lock";
const KEY: &str = "identity.key";
const KEY_TEMP: &str = "identity.key.tmp";
const KEY_MAGIC: &[u8] = b"tidemark identity key\n";
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".log";

const TAG_OPEN: u8 = 1;
const TAG_APPEND: u8 = 2;
const TAG_TRIM: u8 = 3;
const TAG_END: u8 = 4;
const TAG_DROP: u8 = 5;

/// The proxy's replay logs in a directory, crash-safe: append-only
/// checksummed segments, group commits, compaction.
///
/// # The directory
///
/// It is private: created `0700` (with any missing parent), and every file
/// in it `0600`, set as the file is created. The identity key is a secret,
/// and the events are whatever the upstream sent. An existing directory
/// that grants its group or others any permission keeps its mode and gets
/// one warning on stderr (`chmod 700 DIR` fixes it).
///
/// - `lock`: held with an exclusive lock while a [`FileLog`] is open, so a
///   second proxy on the same directory fails at start instead of writing
///   over the first one's log. The operating system drops the lock when the
///   process dies, `kill -9` included.
/// - `identity.key`: the key of the proxy's identity hashes
///   ([`LogStorage::identity_key`]), written once, crash-safely (temporary
///   file, fsync, rename, directory fsync): a magic line, the 32 key bytes,
///   a CRC-32 of both.
/// - `segment-NNNNNNNNNNNNNNNNNNNN.log` (20 decimal digits, counting up from
///   1): the log itself, append-only. Only the last segment is written; it is
///   closed and a new one started once it would pass the segment size.
///
/// # Segments
///
/// A segment is a 16-byte header (`tidemark log` and the format version as
/// a little-endian `u32`, now 1) and then records, each framed as
///
/// ```text
/// len: u32 LE | crc: u32 LE (CRC-32 of the len bytes and the payload) | payload: len bytes
/// ```
///
/// and each payload one [`LogOp`], a tag byte and its fields (integers
/// little-endian, strings and byte strings as a `u32` length and the bytes):
///
/// | tag | op | fields |
/// |---|---|---|
/// | 1 | `Open` | token (16 bytes), kind (1 GET, 2 POST), identity (16 bytes), created (`u64` ms), target (string) |
/// | 2 | `Append` | token, seq (`u64`), time (`u64` ms), upstream id (0, or 1 and a string), frame (byte string) |
/// | 3 | `Trim` | token, first seq (`u64`) |
/// | 4 | `End` | token |
/// | 5 | `Drop` | token |
///
/// [`write`](LogStorage::write) encodes a whole batch, appends it with one
/// write and makes it durable with one `fdatasync` (a group commit). Ops
/// that would change nothing (an `Open` of an open stream, an `Append` not
/// above the stream's last sequence number, a `Trim` that does not
/// move the stream's first event, an `End` of an ended stream, anything for
/// a stream that is not open) are not written, so a batch retried after an
/// error, or written twice, stores each change once.
///
/// # Recovery
///
/// [`open`](FileLog::open) reads every segment in order. The first record of the
/// last segment that is torn (shorter than its frame says, as after a
/// `kill -9` or power loss mid-write) or corrupt (its checksum or payload
/// does not hold) ends the log: the file is cut there and new records go
/// after the last whole one. A corrupt record in an earlier segment costs
/// that segment's remainder only; it is reported on stderr and the segments
/// after it are read. Replay is per stream and does not depend on the order
/// of a stream's records across segments: `Open` creates a stream (once:
/// a repeated `Open` keeps its records), `Append` adds an event (a repeated
/// sequence number is kept once), `Trim` forgets older events, `End` marks
/// the stream ended, `Drop` forgets it. [`recover`](LogStorage::recover)
/// hands back what that leaves.
///
/// # Bounded disk: compaction
///
/// The log knows, per segment, how many bytes of it are still *live*: the
/// newest copy of each open stream's `Open`, `End` and retained events, and
/// its last `Trim` while every one of its events is trimmed (it alone then
/// says where the stream stands). `Trim` and `Drop` ops make records dead.
/// A segment with nothing live is deleted, unless it holds the `Trim` or
/// `Drop` that keeps dead records in an older segment from coming back on
/// recovery; that older segment goes first. When the segments hold more
/// than twice the live bytes plus one segment, the oldest segment is
/// compacted after a write (one segment per write, so a write may take the
/// time of copying one segment's live records): its live records are
/// written again at the end of the log (per stream: the `Open`, the `Trim`,
/// the events oldest first, the `End`; the events' records are copied from
/// the old segment as they are, checksum checked, and one that no longer
/// reads back is reported on stderr and dropped) and made durable, and only then is
/// the old segment deleted (and the directory fsynced, before anything that
/// relies on the deletion). A crash between the two leaves both copies,
/// which recovery reads as one.
///
/// # Errors
///
/// A failed write or fsync (a full disk, an I/O error) returns `Err` and
/// leaves the segment cut back to its last whole batch (or marks it to be cut
/// before the next write), so a retry appends cleanly. Compaction never fails
/// a write: the batch is durable by then; a compaction error is reported on
/// stderr and tried again after the next new segment.
pub struct FileLog {
    dir: PathBuf,
    /// Held (locked) for as long as the log is open.
    _lock: File,
    segment_bytes: u64,
    /// Every segment on disk, oldest first; the last is the active one.
    segments: BTreeMap<u64, Segment>,
    active: File,
    active_id: u64,
    /// Where the active segment's last whole batch ends.
    active_len: u64,
    /// A failed write may have left bytes after `active_len`.
    torn: bool,
    streams: TokenMap<Stream>,
    /// Dropped streams whose `Drop` record is still on disk.
    graves: TokenMap<Grave>,
    recovered: Vec<StoredStream>,
    /// A segment may have become deletable.
    collect_due: bool,
    /// Compaction failed; wait for the next segment before trying again.
    compaction_failed: bool,
    #[cfg(test)]
    faults: tests::Faults,
}

/// One segment's bookkeeping.
#[derive(Debug)]
struct Segment {
    /// Bytes on disk.
    size: u64,
    /// Bytes of live records.
    live: u64,
}

/// Where one record is stored: its segment, where it starts there, and
/// its framed length.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Loc {
    seg: u64,
    offset: u64,
    len: u64,
}

/// A retained event: its sequence number and its record on disk. The event
/// itself is not kept here (the proxy's memory log has it); compaction
/// copies the record from the disk.
#[derive(Copy, Clone, Debug)]
struct Stored {
    seq: u64,
    loc: Loc,
}

/// An open stream: its live records and where they are.
#[derive(Debug)]
struct Stream {
    meta: StreamMeta,
    open: Loc,
    /// Retained events, oldest first.
    records: VecDeque<Stored>,
    /// Events before this were trimmed.
    floor: u64,
    /// The lowest sequence number an `Append` may still store.
    next_seq: u64,
    end: Option<Loc>,
    /// The `Trim` record that set `floor`, if it is on disk.
    trim: Option<Loc>,
    /// Segments holding any copy of an `Append` of this stream, live or not.
    append_segs: BTreeSet<u64>,
    /// Segments holding any record of this stream.
    segs: BTreeSet<u64>,
}

impl Stream {
    /// The `Trim` record, when it is live: every event was trimmed, so it
    /// alone keeps the stream's place (no `Append` below `floor` may be
    /// stored after a reopen).
    fn live_trim(&self) -> Option<Loc> {
        self.trim.filter(|_| self.records.is_empty())
    }
}

/// A dropped stream whose records may still be on disk.
#[derive(Debug)]
struct Grave {
    /// The segment of its newest `Drop` record.
    drop_seg: u64,
    /// Segments holding any record of it.
    segs: BTreeSet<u64>,
}

impl fmt::Debug for FileLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLog")
            .field("dir", &self.dir)
            .field("segment_bytes", &self.segment_bytes)
            .field("segments", &self.segments.len())
            .field("streams", &self.streams.len())
            .field("disk_bytes", &self.disk_bytes())
            .field("live_bytes", &self.live_bytes())
            .finish_non_exhaustive()
    }
}

impl FileLog {
    /// The size past which the active segment is closed and a new one begun:
    /// 64 MiB.
    pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

    /// Opens the log in `dir` (creating the directory if needed) with
    /// segments of [`DEFAULT_SEGMENT_BYTES`](Self::DEFAULT_SEGMENT_BYTES),
    /// and reads it back: see [`recover`](LogStorage::recover).
    ///
    /// Fails with [`io::ErrorKind::ResourceBusy`] if another `FileLog`
    /// (another proxy) has the directory open, and with
    /// [`io::ErrorKind::InvalidData`] if a segment is of a newer format.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<FileLog> {
        Self::open_with_segment_bytes(dir, Self::DEFAULT_SEGMENT_BYTES)
    }

    /// [`open`](Self::open) with segments of about `segment_bytes` (a batch
    /// is never split, so a segment holding one large batch is larger).
    pub fn open_with_segment_bytes(
        dir: impl AsRef<Path>,
        segment_bytes: u64,
    ) -> io::Result<FileLog> {
        let dir = dir.as_ref().to_path_buf();
        private_dir(&dir).map_err(|e| at(&dir, e))?;
        let lock = lock_dir(&dir)?;
        remove_if_present(&dir.join(KEY_TEMP))?;

        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| at(&dir, e))? {
            let entry = entry.map_err(|e| at(&dir, e))?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();

        let mut replay = Replay::default();
        let mut segments = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let size = replay.segment(&dir, id, i + 1 == ids.len())?;
            segments.insert(id, Segment { size, live: 0 });
        }
        let (active_id, active, active_len) = match ids.last() {
            Some(&id) => {
                let path = segment_path(&dir, id);
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| at(&path, e))?;
                (id, file, segments[&id].size)
            }
            None => {
                let file = create_segment(&dir, 1)?;
                segments.insert(
                    1,
                    Segment {
                        size: HEADER_LEN,
                        live: 0,
                    },
                );
                (1, file, HEADER_LEN)
            }
        };

        let mut log = FileLog {
            dir,
            _lock: lock,
            segment_bytes,
            segments,
            active,
            active_id,
            active_len,
            torn: false,
            streams: TokenMap::default(),
            graves: replay.graves,
            recovered: Vec::new(),
            collect_due: true,
            compaction_failed: false,
            #[cfg(test)]
            faults: tests::Faults::default(),
        };
        for (token, mut entry) in replay.entries {
            let Some((meta, open)) = entry.meta else {
                continue; // records of a stream whose Open is lost: dead
            };
            let (kept, records): (Vec<LogRecord>, VecDeque<Stored>) = entry
                .records
                .split_off(&entry.floor)
                .into_iter()
                .map(|(seq, (record, loc))| (record, Stored { seq, loc }))
                .unzip();
            let next_seq = records.back().map_or(1, |s| s.seq + 1).max(entry.floor);
            log.live(open, true);
            for stored in &records {
                log.live(stored.loc, true);
            }
            if let Some(end) = entry.end {
                log.live(end, true);
            }
            log.recovered.push(StoredStream {
                meta: meta.clone(),
                records: kept,
                ended: entry.end.is_some(),
            });
            let stream = Stream {
                meta,
                open,
                records,
                floor: entry.floor,
                next_seq,
                end: entry.end,
                trim: entry.trim,
                append_segs: entry.append_segs,
                segs: entry.segs,
            };
            if let Some(trim) = stream.live_trim() {
                log.live(trim, true);
            }
            log.streams.insert(token, stream);
        }
        log.recovered
            .sort_by_key(|s| (s.meta.created, s.meta.token));
        log.collect()?;
        Ok(log)
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    /// Bytes of the records still live (what compaction would keep).
    pub fn live_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.live).sum()
    }

    /// How many segment files the log has.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Counts `loc` as live (or no longer live) in its segment.
    fn live(&mut self, loc: Loc, live: bool) {
        let segment = self
            .segments
            .get_mut(&loc.seg)
            .expect("a live record's segment exists");
        if live {
            segment.live += loc.len;
        } else {
            segment.live -= loc.len;
            if segment.live == 0 && loc.seg != self.active_id {
                self.collect_due = true;
            }
        }
    }

    /// Whether the log stores `op`, given the ops before it in the batch
    /// (`batch`: the state of each stream they touched).
    fn accepts(&self, batch: &mut TokenMap<View>, op: &LogOp) -> bool {
        let token = op_token(op);
        let view = batch
            .entry(token)
            .or_insert_with(|| match self.streams.get(&token) {
                Some(s) => View {
                    open: true,
                    floor: s.floor,
                    next_seq: s.next_seq,
                    ended: s.end.is_some(),
                },
                None => View::default(),
            });
        match op {
            LogOp::Open(_) if !view.open => {
                *view = View {
                    open: true,
                    floor: 0,
                    next_seq: 1,
                    ended: false,
                };
                true
            }
            LogOp::Append { record, .. } if view.open && record.seq >= view.next_seq => {
                view.next_seq = record.seq + 1;
                true
            }
            LogOp::Trim { first_seq, .. } if view.open && *first_seq > view.floor => {
                view.floor = *first_seq;
                view.next_seq = view.next_seq.max(*first_seq);
                true
            }
            LogOp::End { .. } if view.open && !view.ended => {
                view.ended = true;
                true
            }
            LogOp::Drop { .. } if view.open => {
                view.open = false;
                true
            }
            _ => false,
        }
    }

    /// Applies a stored `op` to the bookkeeping.
    fn apply(&mut self, op: &LogOp, loc: Loc) {
        match op {
            LogOp::Open(meta) => {
                self.live(loc, true);
                self.streams.insert(
                    meta.token,
                    Stream {
                        meta: meta.clone(),
                        open: loc,
                        records: VecDeque::new(),
                        floor: 0,
                        next_seq: 1,
                        end: None,
                        trim: None,
                        append_segs: BTreeSet::new(),
                        segs: BTreeSet::from([loc.seg]),
                    },
                );
            }
            LogOp::Append { token, record } => {
                self.live(loc, true);
                let stream = self.streams.get_mut(token).expect("accepted: open");
                let trim = stream.live_trim();
                stream.next_seq = record.seq + 1;
                stream.records.push_back(Stored {
                    seq: record.seq,
                    loc,
                });
                // Appends go to the newest segment: most are in it already.
                if stream.append_segs.last() != Some(&loc.seg) {
                    stream.append_segs.insert(loc.seg);
                }
                if stream.segs.last() != Some(&loc.seg) {
                    stream.segs.insert(loc.seg);
                }
                if let Some(trim) = trim {
                    self.live(trim, false);
                }
            }
            LogOp::Trim { token, first_seq } => {
                let stream = self.streams.get_mut(token).expect("accepted: open");
                let mut dead: Vec<Loc> = stream.live_trim().into_iter().collect();
                stream.floor = *first_seq;
                stream.next_seq = stream.next_seq.max(*first_seq);
                let previous = stream.trim.replace(loc);
                stream.segs.insert(loc.seg);
                while stream.records.front().is_some_and(|s| s.seq < *first_seq) {
                    dead.push(stream.records.pop_front().expect("front").loc);
                }
                let trim = stream.live_trim();
                for loc in dead {
                    self.live(loc, false);
                }
                if let Some(trim) = trim {
                    self.live(trim, true);
                }
                if previous.is_some_and(|p| p.seg != loc.seg) {
                    self.collect_due = true;
                }
            }
            LogOp::End { token } => {
                self.live(loc, true);
                let stream = self.streams.get_mut(token).expect("accepted: open");
                stream.end = Some(loc);
                stream.segs.insert(loc.seg);
            }
            LogOp::Drop { token } => {
                let stream = self.streams.remove(token).expect("accepted: open");
                self.live(stream.open, false);
                for stored in &stream.records {
                    self.live(stored.loc, false);
                }
                if let Some(end) = stream.end {
                    self.live(end, false);
                }
                if let Some(trim) = stream.live_trim() {
                    self.live(trim, false);
                }
                let grave = self.graves.entry(*token).or_insert_with(|| Grave {
                    drop_seg: loc.seg,
                    segs: BTreeSet::new(),
                });
                grave.drop_seg = loc.seg;
                grave.segs.extend(stream.segs);
                grave.segs.insert(loc.seg);
                self.collect_due = true;
            }
        }
    }

    /// Appends `buf` (whole records) to the log and makes it durable, in a
    /// new segment if the active one would grow past the segment size.
    /// Returns the segment and offset it went to.
    fn append(&mut self, buf: &[u8]) -> io::Result<(u64, u64)> {
        let path = segment_path(&self.dir, self.active_id);
        if self.torn {
            self.active
                .set_len(self.active_len)
                .map_err(|e| at(&path, e))?;
            self.torn = false;
        }
        if self.active_len > HEADER_LEN && self.active_len + buf.len() as u64 > self.segment_bytes {
            self.roll()?;
        }
        let path = segment_path(&self.dir, self.active_id);
        let offset = self.active_len;
        self.torn = true;
        let written = self.write_at(offset, buf).and_then(|()| self.sync());
        if let Err(e) = written {
            if self.active.set_len(offset).is_ok() {
                self.torn = false;
            }
            return Err(at(&path, e));
        }
        self.torn = false;
        self.active_len = offset + buf.len() as u64;
        self.segments
            .get_mut(&self.active_id)
            .expect("the active segment exists")
            .size = self.active_len;
        Ok((self.active_id, offset))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.active.seek(SeekFrom::Start(offset))?;
        #[cfg(test)]
        if let Some(n) = self.faults.short_write.take() {
            self.active.write_all(&buf[..n.min(buf.len())])?;
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "injected short write",
            ));
        }
        self.active.write_all(buf)
    }

    fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.faults.fail_sync) {
            return Err(io::Error::other("injected fsync failure"));
        }
        self.active.sync_data()
    }

    /// Closes the active segment and starts the next one.
    fn roll(&mut self) -> io::Result<()> {
        let id = self.active_id + 1;
        self.active = create_segment(&self.dir, id)?;
        self.segments.insert(
            id,
            Segment {
                size: HEADER_LEN,
                live: 0,
            },
        );
        self.active_id = id;
        self.active_len = HEADER_LEN;
        self.torn = false;
        self.compaction_failed = false;
        self.collect_due = true;
        Ok(())
    }

    /// Deletes what is dead and compacts if dead bytes dominate; reports a
    /// failure on stderr (the batch is durable already).
    fn maintain(&mut self) {
        if let Err(e) = self.try_maintain() {
            eprintln!(
                "tidemark: log {}: compaction failed (retried after the next segment): {e}",
                self.dir.display()
            );
            self.compaction_failed = true;
        }
    }

    fn try_maintain(&mut self) -> io::Result<()> {
        if self.collect_due {
            self.collect()?;
        }
        if !self.compaction_failed
            && self.segments.len() > 1
            && self.disk_bytes() > 2 * self.live_bytes() + self.segment_bytes
        {
            self.compact_oldest()?;
            self.collect()?;
        }
        Ok(())
    }

    /// Segments that hold a `Trim` or `Drop` record still keeping dead
    /// records of an older segment from coming back.
    fn pinned(&self) -> BTreeSet<u64> {
        let mut pinned = BTreeSet::new();
        for stream in self.streams.values() {
            if let Some(trim) = stream.trim
                && stream.append_segs.first().is_some_and(|&s| s < trim.seg)
            {
                pinned.insert(trim.seg);
            }
        }
        for grave in self.graves.values() {
            if grave.segs.first().is_some_and(|&s| s < grave.drop_seg) {
                pinned.insert(grave.drop_seg);
            }
        }
        pinned
    }

    /// Deletes every segment with nothing live that no newer record needs.
    fn collect(&mut self) -> io::Result<()> {
        loop {
            let pinned = self.pinned();
            let dead: Vec<u64> = self
                .segments
                .iter()
                .filter(|&(&id, s)| id != self.active_id && s.live == 0 && !pinned.contains(&id))
                .map(|(&id, _)| id)
                .collect();
            if dead.is_empty() {
                break;
            }
            for id in dead {
                self.delete_segment(id)?;
            }
        }
        self.collect_due = false;
        Ok(())
    }

    /// Deletes segment `id` durably (the directory is fsynced before
    /// anything else is deleted) and forgets it.
    fn delete_segment(&mut self, id: u64) -> io::Result<()> {
        remove_if_present(&segment_path(&self.dir, id))?;
        sync_dir(&self.dir)?;
        self.segments.remove(&id);
        for stream in self.streams.values_mut() {
            stream.append_segs.remove(&id);
            stream.segs.remove(&id);
            if stream.trim.is_some_and(|t| t.seg == id) {
                stream.trim = None;
            }
        }
        self.graves.retain(|_, grave| {
            grave.segs.remove(&id);
            grave.drop_seg != id
        });
        Ok(())
    }

    /// Writes the live records of the oldest segment again at the end of the
    /// log, makes them durable, then deletes the oldest segment.
    fn compact_oldest(&mut self) -> io::Result<()> {
        let oldest = *self.segments.keys().next().expect("a segment");
        if oldest == self.active_id {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut moves = Vec::new();
        // The oldest segment's bytes, read once if an event is to be moved.
        let mut old = None;
        let mut lost = Vec::new();
        for (token, stream) in &self.streams {
            if stream.open.seg == oldest {
                let len = encode_open(&mut buf, &stream.meta)?;
                moves.push((*token, Move::Open, len));
            }
            if stream.live_trim().is_some_and(|trim| trim.seg == oldest) {
                let trim = LogOp::Trim {
                    token: *token,
                    first_seq: stream.floor,
                };
                let len = encode_op(&mut buf, &trim)?;
                moves.push((*token, Move::Trim, len));
            }
            for (i, stored) in stream.records.iter().enumerate() {
                if stored.loc.seg == oldest {
                    let bytes = match &old {
                        Some(bytes) => bytes,
                        None => {
                            let path = segment_path(&self.dir, oldest);
                            old.insert(fs::read(&path).map_err(|e| at(&path, e))?)
                        }
                    };
                    match moved_record(bytes, stored.loc, *token, stored.seq) {
                        Some(record) => {
                            buf.extend_from_slice(record);
                            moves.push((*token, Move::Record(i), stored.loc.len));
                        }
                        None => lost.push((*token, i)),
                    }
                }
            }
            if stream.end.is_some_and(|end| end.seg == oldest) {
                let len = encode_token_op(&mut buf, TAG_END, *token)?;
                moves.push((*token, Move::End, len));
            }
        }
        if !buf.is_empty() {
            let (seg, mut offset) = self.append(&buf)?;
            for (token, what, len) in moves {
                let new = Loc { seg, offset, len };
                offset += len;
                let stream = self.streams.get_mut(&token).expect("a live stream");
                stream.segs.insert(seg);
                let old = match what {
                    Move::Open => std::mem::replace(&mut stream.open, new),
                    Move::Trim => stream.trim.replace(new).expect("trimmed"),
                    Move::Record(i) => {
                        stream.append_segs.insert(seg);
                        std::mem::replace(&mut stream.records[i].loc, new)
                    }
                    Move::End => stream.end.replace(new).expect("ended"),
                };
                self.live(old, false);
                self.live(new, true);
            }
        }
        if !lost.is_empty() {
            report(
                &segment_path(&self.dir, oldest),
                format!(
                    "no longer reads back {} retained event(s) (changed on disk since it \
                     was written); compaction drops them",
                    lost.len()
                ),
            );
        }
        // Dropped once the moves are booked (they name events by index),
        // each stream's from its newest, so that the indices still to come
        // stay right.
        for &(token, i) in lost.iter().rev() {
            let stream = self.streams.get_mut(&token).expect("a live stream");
            let gone = stream.records.remove(i).expect("a retained event");
            self.live(gone.loc, false);
        }
        #[cfg(test)]
        if self.faults.crash_mid_compaction {
            // As if the process died here: both copies stay on disk.
            return Err(io::Error::other(
                "injected crash before the old segment is deleted",
            ));
        }
        debug_assert_eq!(self.segments[&oldest].live, 0);
        self.delete_segment(oldest)
    }
}

/// What compaction moves.
#[derive(Copy, Clone, Debug)]
enum Move {
    Open,
    Trim,
    Record(usize),
    End,
}

/// The state of a stream while a batch is planned.
#[derive(Copy, Clone, Debug, Default)]
struct View {
    open: bool,
    floor: u64,
    next_seq: u64,
    ended: bool,
}

impl LogStorage for FileLog {
    fn write(&mut self, ops: &[LogOp]) -> io::Result<()> {
        let mut batch = TokenMap::default();
        let mut buf = Vec::new();
        let mut planned = Vec::new();
        for op in ops {
            if self.accepts(&mut batch, op) {
                let len = encode_op(&mut buf, op)?;
                planned.push((op, len));
            }
        }
        if planned.is_empty() {
            return Ok(());
        }
        let (seg, mut offset) = self.append(&buf)?;
        for (op, len) in planned {
            self.apply(op, Loc { seg, offset, len });
            offset += len;
        }
        self.maintain();
        Ok(())
    }

    /// Every stream the log holds, oldest first (by creation time), each
    /// with its retained events oldest first, as read at
    /// [`open`](FileLog::open). Later calls return nothing.
    fn recover(&mut self) -> io::Result<Vec<StoredStream>> {
        Ok(std::mem::take(&mut self.recovered))
    }

    fn identity_key(&mut self, fresh: [u8; 32]) -> io::Result<[u8; 32]> {
        let path = self.dir.join(KEY);
        match fs::read(&path) {
            Ok(bytes) => decode_key(&bytes).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a valid identity key file (if it is lost for good, \
                         remove it: the logged streams then belong to nobody)",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = Vec::with_capacity(KEY_MAGIC.len() + 36);
                bytes.extend_from_slice(KEY_MAGIC);
                bytes.extend_from_slice(&fresh);
                let crc = crc32fast::hash(&bytes);
                bytes.extend_from_slice(&crc.to_le_bytes());
                replace_durably(&self.dir, KEY, &bytes).map_err(|(path, e)| at(&path, e))?;
                Ok(fresh)
            }
            Err(e) => Err(at(&path, e)),
        }
    }
}

fn decode_key(bytes: &[u8]) -> Option<[u8; 32]> {
    let body = bytes.strip_prefix(KEY_MAGIC)?;
    if body.len() != 36 {
        return None;
    }
    let (key, crc) = body.split_at(32);
    let stored = u32::from_le_bytes(crc.try_into().ok()?);
    (crc32fast::hash(&bytes[..bytes.len() - 4]) == stored).then(|| key.try_into().expect("32"))
}

/// Takes the directory's lock, or says who holds it.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK);
    let file = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| at(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "log directory {} is in use by another process (its lock file {} is held): \
                 is another tidemark proxy running with this --log?",
                dir.display(),
                path.display()
            ),
        )),
        Err(TryLockError::Error(e)) => Err(io::Error::new(
            e.kind(),
            format!("{}: cannot lock the log directory: {e}", path.display()),
        )),
    }
}

fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    let path = segment_path(dir, id);
    let made = (|| {
        let mut file = private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all(&header())?;
        file.sync_all()?;
        Ok(file)
    })();
    match made {
        Ok(file) => {
            sync_dir(dir)?;
            Ok(file)
        }
        Err(e) => {
            let _ = fs::remove_file(&path);
            Err(at(&path, e))
        }
    }
}

fn header() -> [u8; HEADER_LEN as usize] {
    let mut header = [0; HEADER_LEN as usize];
    header[..12].copy_from_slice(MAGIC);
    header[12..].copy_from_slice(&VERSION.to_le_bytes());
    header
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{id:020}{SEGMENT_SUFFIX}"))
}

fn segment_id(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&id| id > 0)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(dir, e))
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(at(path, e)),
    }
}

/// `error`, naming `path`.
fn at(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

fn op_token(op: &LogOp) -> StreamToken {
    match op {
        LogOp::Open(meta) => meta.token,
        LogOp::Append { token, .. }
        | LogOp::Trim { token, .. }
        | LogOp::End { token }
        | LogOp::Drop { token } => *token,
    }
}

// --- Encoding -------------------------------------------------------------

/// Appends `op` to `out` as one framed record; returns its length.
fn encode_op(out: &mut Vec<u8>, op: &LogOp) -> io::Result<u64> {
    match op {
        LogOp::Open(meta) => encode_open(out, meta),
        LogOp::Append { token, record } => encode_append(out, *token, record),
        LogOp::Trim { token, first_seq } => frame(out, |p| {
            p.push(TAG_TRIM);
            p.extend_from_slice(&token.to_bytes());
            p.extend_from_slice(&first_seq.to_le_bytes());
        }),
        LogOp::End { token } => encode_token_op(out, TAG_END, *token),
        LogOp::Drop { token } => encode_token_op(out, TAG_DROP, *token),
    }
}

fn encode_open(out: &mut Vec<u8>, meta: &StreamMeta) -> io::Result<u64> {
    frame(out, |p| {
        p.push(TAG_OPEN);
        p.extend_from_slice(&meta.token.to_bytes());
        p.push(match meta.kind {
            StreamKind::Get => 1,
            StreamKind::Post => 2,
        });
        p.extend_from_slice(&meta.identity.to_bytes());
        p.extend_from_slice(&meta.created.as_u64().to_le_bytes());
        put_bytes(p, meta.target.as_bytes());
    })
}

fn encode_append(out: &mut Vec<u8>, token: StreamToken, record: &LogRecord) -> io::Result<u64> {
    frame(out, |p| {
        p.push(TAG_APPEND);
        p.extend_from_slice(&token.to_bytes());
        p.extend_from_slice(&record.seq.to_le_bytes());
        p.extend_from_slice(&record.time.as_u64().to_le_bytes());
        match record.upstream_id() {
            None => p.push(0),
            Some(id) => {
                p.push(1);
                put_bytes(p, id.as_bytes());
            }
        }
        put_bytes(p, record.frame());
    })
}

fn encode_token_op(out: &mut Vec<u8>, tag: u8, token: StreamToken) -> io::Result<u64> {
    frame(out, |p| {
        p.push(tag);
        p.extend_from_slice(&token.to_bytes());
    })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // A field over 4 GiB makes its record too long, which `frame` refuses.
    out.extend_from_slice(&(bytes.len().min(u32::MAX as usize) as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends the record `payload` writes, framed: length, CRC-32, payload.
fn frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) -> io::Result<u64> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_LEN]);
    payload(out);
    let Ok(len) = u32::try_from(out.len() - start - FRAME_LEN) else {
        out.truncate(start);
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a log record of 4 GiB or more",
        ));
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&out[start + FRAME_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok((out.len() - start) as u64)
}

// --- Decoding and replay --------------------------------------------------

/// Why a record could not be read.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Bad {
    /// Shorter than its frame says: the end of a write cut short.
    Torn,
    /// Its checksum or payload does not hold.
    Corrupt,
}

/// The op at the start of `bytes` and its framed length.
fn parse_record(bytes: &[u8]) -> Result<(LogOp, usize), Bad> {
    let (payload, end) = framed(bytes)?;
    decode_op(payload).map(|op| (op, end)).ok_or(Bad::Corrupt)
}

/// The payload of the record at the start of `bytes`, checksum checked,
/// and the record's framed length.
fn framed(bytes: &[u8]) -> Result<(&[u8], usize), Bad> {
    if bytes.len() < FRAME_LEN {
        return Err(Bad::Torn);
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let end = FRAME_LEN + len as usize;
    if bytes.len() < end {
        return Err(Bad::Torn);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..4]);
    hasher.update(&bytes[FRAME_LEN..end]);
    if hasher.finalize() != crc {
        return Err(Bad::Corrupt);
    }
    Ok((&bytes[FRAME_LEN..end], end))
}

/// The record at `loc` in `segment` (its bytes), as compaction copies it:
/// whole, its checksum right, and the `Append` of event `seq` of `token`
/// (the fields it starts with). `None` if it is not.
fn moved_record(segment: &[u8], loc: Loc, token: StreamToken, seq: u64) -> Option<&[u8]> {
    let start = usize::try_from(loc.offset).ok()?;
    let record = segment.get(start..start.checked_add(usize::try_from(loc.len).ok()?)?)?;
    let (payload, end) = framed(record).ok()?;
    let mut fields = Reader(payload);
    let ours = end == record.len()
        && fields.u8()? == TAG_APPEND
        && fields.token()? == token
        && fields.u64()? == seq;
    ours.then_some(record)
}

fn decode_op(payload: &[u8]) -> Option<LogOp> {
    let mut r = Reader(payload);
    let op = match r.u8()? {
        TAG_OPEN => {
            let token = r.token()?;
            let kind = match r.u8()? {
                1 => StreamKind::Get,
                2 => StreamKind::Post,
                _ => return None,
            };
            let identity = Identity::from_bytes(r.array()?);
            let created = Millis(r.u64()?);
            let target = r.text()?.to_owned();
            LogOp::Open(StreamMeta {
                token,
                kind,
                target,
                identity,
                created,
            })
        }
        TAG_APPEND => {
            let token = r.token()?;
            let seq = r.u64()?;
            let time = Millis(r.u64()?);
            let upstream_id = match r.u8()? {
                0 => None,
                1 => Some(r.text()?),
                _ => return None,
            };
            LogOp::Append {
                token,
                record: LogRecord::new(seq, time, upstream_id, r.bytes()?),
            }
        }
        TAG_TRIM => LogOp::Trim {
            token: r.token()?,
            first_seq: r.u64()?,
        },
        TAG_END => LogOp::End { token: r.token()? },
        TAG_DROP => LogOp::Drop { token: r.token()? },
        _ => return None,
    };
    r.0.is_empty().then_some(op)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    fn token(&mut self) -> Option<StreamToken> {
        Some(StreamToken::from_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.array()?);
        self.take(len as usize)
    }

    fn text(&mut self) -> Option<&'a str> {
        core::str::from_utf8(self.bytes()?).ok()
    }
}

/// A stream as replay finds it, before its `Open` may have been seen.
#[derive(Default)]
struct Entry {
    meta: Option<(StreamMeta, Loc)>,
    /// The newest copy of each event, and where it is.
    records: BTreeMap<u64, (LogRecord, Loc)>,
    floor: u64,
    trim: Option<Loc>,
    end: Option<Loc>,
    append_segs: BTreeSet<u64>,
    segs: BTreeSet<u64>,
}

/// The state of a replay of the segments.
#[derive(Default)]
struct Replay {
    entries: HashMap<StreamToken, Entry>,
    graves: TokenMap<Grave>,
}

impl Replay {
    /// Replays segment `id` and returns its size; cuts a torn or corrupt
    /// tail if it is the `last` segment.
    fn segment(&mut self, dir: &Path, id: u64, last: bool) -> io::Result<u64> {
        let path = segment_path(dir, id);
        let bytes = fs::read(&path).map_err(|e| at(&path, e))?;
        let header = header();
        if bytes.len() >= header.len() && bytes[..MAGIC.len()] == *MAGIC {
            let version = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
            if version != VERSION {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: log format version {version}; this build reads version {VERSION}",
                        path.display()
                    ),
                ));
            }
        } else if last {
            // A segment whose creation was cut short (or not ours at all).
            if !header.starts_with(&bytes) {
                report(&path, "has no valid header; starting it again".into());
            }
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| at(&path, e))?;
            file.set_len(0)
                .and_then(|()| file.write_all(&header))
                .and_then(|()| file.sync_all())
                .map_err(|e| at(&path, e))?;
            return Ok(HEADER_LEN);
        } else {
            report(
                &path,
                "has no valid header; skipping it (its records are lost)".into(),
            );
            return Ok(bytes.len() as u64);
        }
        let mut offset = HEADER_LEN as usize;
        while offset < bytes.len() {
            match parse_record(&bytes[offset..]) {
                Ok((op, len)) => {
                    self.apply(
                        op,
                        Loc {
                            seg: id,
                            offset: offset as u64,
                            len: len as u64,
                        },
                    );
                    offset += len;
                }
                Err(bad) if last => {
                    let what = match bad {
                        Bad::Torn => "a torn record",
                        Bad::Corrupt => "a corrupt record",
                    };
                    report(
                        &path,
                        format!(
                            "cut at offset {offset}: {what}, {} bytes dropped",
                            bytes.len() - offset
                        ),
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| at(&path, e))?;
                    file.set_len(offset as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| at(&path, e))?;
                    return Ok(offset as u64);
                }
                Err(_) => {
                    report(
                        &path,
                        format!(
                            "corrupt record at offset {offset}; skipping the rest of this \
                             segment ({} bytes, lost) and reading on",
                            bytes.len() - offset
                        ),
                    );
                    break;
                }
            }
        }
        Ok(bytes.len() as u64)
    }

    fn apply(&mut self, op: LogOp, loc: Loc) {
        let token = op_token(&op);
        if let LogOp::Drop { .. } = op {
            let grave = self.graves.entry(token).or_insert_with(|| Grave {
                drop_seg: loc.seg,
                segs: BTreeSet::new(),
            });
            grave.drop_seg = loc.seg;
            grave.segs.insert(loc.seg);
            if let Some(entry) = self.entries.remove(&token) {
                grave.segs.extend(entry.segs);
            }
            return;
        }
        let entry = self.entries.entry(token).or_default();
        entry.segs.insert(loc.seg);
        match op {
            LogOp::Open(meta) => match &mut entry.meta {
                Some((_, at)) => *at = loc,
                None => entry.meta = Some((meta, loc)),
            },
            LogOp::Append { record, .. } => {
                entry.append_segs.insert(loc.seg);
                entry.records.insert(record.seq, (record, loc));
            }
            LogOp::Trim { first_seq, .. } => {
                if first_seq >= entry.floor {
                    entry.floor = first_seq;
                    entry.trim = Some(loc);
                }
            }
            LogOp::End { .. } => entry.end = Some(loc),
            LogOp::Drop { .. } => unreachable!("handled above"),
        }
    }
}

fn report(path: &Path, what: String) {
    eprintln!("tidemark: log segment {} {what}", path.display());
}

#[cfg(test)]
mod tests;
