//! A restricted reader for pickled PyTorch files (`torch.save`'s zip archive: `.pt`, `.bin`).
//!
//! A pickle is a program: unpickling it with Python's `pickle` may call any importable function
//! (`os.system`, `eval`, ...), which is how malicious embeddings spread. This reader runs nothing.
//! candle's `pickle::Stack` interprets the opcodes into an inert object tree (a call is recorded
//! as "callable + arguments", never made), and [`to_value`] then accepts only what a tensor file
//! needs: numbers, strings, lists, tuples, dicts (`OrderedDict` included), tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, and the `torch.nn.ParameterDict` that
//! the original textual-inversion code saved. Any other callable or class is refused with its
//! name; nothing is imported or executed either way.
//!
//! Archive layout (torch ≥ 1.6): `<prefix>/data.pkl` (the pickle), `<prefix>/data/<key>` (raw
//! little-endian storages), `<prefix>/byteorder`, `<prefix>/version`.

use super::RawFile;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};

/// A pickled value after the allow-list: plain data and tensors only.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
}

impl Value {
    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Upper bounds that keep a hostile archive from exhausting memory or the stack.
const MAX_PICKLE_BYTES: u64 = 16 << 20;
const MAX_STORAGE_BYTES: u64 = 1 << 30;
const MAX_DEPTH: usize = 64;
/// Bounds on the object tree the interpreter may build (nodes, including the copies memo
/// references make), checked before interpreting: a few kilobytes of pickle can otherwise describe
/// an exponentially large or deeply nested tree.
const MAX_NODES: u64 = 4_000_000;

struct Archive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    /// `<prefix>/` of the entries, e.g. `archive/`.
    prefix: String,
    storages: HashMap<String, Vec<u8>>,
}

impl Archive<'_> {
    fn storage(&mut self, key: &str) -> Result<&[u8]> {
        if !self.storages.contains_key(key) {
            let name = format!("{}data/{key}", self.prefix);
            let entry = self
                .zip
                .by_name(&name)
                .with_context(|| format!("the archive has no storage '{name}'"))?;
            if entry.size() > MAX_STORAGE_BYTES {
                bail!("storage '{name}' is too large ({} bytes)", entry.size())
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .take(MAX_STORAGE_BYTES)
                .read_to_end(&mut bytes)
                .with_context(|| format!("cannot read storage '{name}'"))?;
            self.storages.insert(key.to_string(), bytes);
        }
        Ok(&self.storages[key])
    }
}

/// Parses a `torch.save` zip archive into its top-level object, refusing anything but data.
pub(crate) fn read_archive(bytes: &[u8]) -> Result<RawFile> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| anyhow!("not a readable PyTorch archive ({e})"))?;
    let pkl_names: Vec<String> = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .collect();
    let [pkl_name] = pkl_names.as_slice() else {
        bail!(
            "not a PyTorch archive: expected one data.pkl, found {}",
            pkl_names.len()
        )
    };
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        let _ = f.read_to_string(&mut order);
        if order.trim() == "big" {
            bail!("big-endian PyTorch archives are not supported")
        }
    }
    let pickle = {
        let entry = zip.by_name(pkl_name)?;
        if entry.size() > MAX_PICKLE_BYTES {
            bail!("data.pkl is too large ({} bytes)", entry.size())
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.take(MAX_PICKLE_BYTES).read_to_end(&mut data)?;
        data
    };
    check_budget(&pickle).with_context(|| format!("cannot parse the pickle in {pkl_name}"))?;
    let parsed = std::panic::catch_unwind(|| -> candle_core::Result<Object> {
        let mut stack = Stack::empty();
        stack.read_loop(&mut Cursor::new(&pickle))?;
        stack.finalize()
    });
    let object = match parsed {
        Ok(Ok(object)) => object,
        Ok(Err(e)) => bail!("cannot parse the pickle in {pkl_name}: {e}"),
        Err(_) => bail!("cannot parse the pickle in {pkl_name}: malformed"),
    };
    let mut archive = Archive {
        zip,
        prefix,
        storages: HashMap::new(),
    };
    let value = to_value(object, &mut archive, 0)?;
    let Value::Dict(items) = &value else {
        bail!("the pickle holds a {}, not a dict of tensors", value.kind())
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = HashMap::new();
    for (k, v) in items {
        let Value::Str(k) = k else { continue };
        match v {
            Value::Tensor(t) => {
                tensors.insert(k.clone(), t.clone());
            }
            Value::Str(s) => {
                metadata.insert(k.clone(), s.clone());
            }
            Value::Int(i) => {
                metadata.insert(k.clone(), i.to_string());
            }
            Value::Float(f) => {
                metadata.insert(k.clone(), f.to_string());
            }
            _ => {}
        }
    }
    Ok(RawFile {
        tensors,
        metadata,
        pickled: true,
        pickle: Some(value),
    })
}

/// Walks the opcodes without building anything, tracking for each stack entry the size and depth
/// of the tree candle's interpreter would build (memo gets copy their entry, as candle does), and
/// refuses pickles over [`MAX_NODES`] / [`MAX_DEPTH`] or with opcodes outside the set torch's
/// protocol-2 pickles use.
fn check_budget(pickle: &[u8]) -> Result<()> {
    #[derive(Clone, Copy)]
    struct Entry {
        nodes: u64,
        depth: usize,
    }
    const LEAF: Entry = Entry { nodes: 1, depth: 1 };
    fn join(items: &[Option<Entry>]) -> Entry {
        items.iter().flatten().fold(LEAF, |acc, e| Entry {
            nodes: acc.nodes.saturating_add(e.nodes),
            depth: acc.depth.max(e.depth + 1),
        })
    }
    let mut stack: Vec<Option<Entry>> = Vec::new(); // None is a MARK
    let mut memo: HashMap<u32, Entry> = HashMap::new();
    let mut built: u64 = 0;
    let byte = |r: &mut Cursor<&[u8]>| -> Result<u8> {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).context("truncated pickle")?;
        Ok(b[0])
    };
    let skip = |r: &mut Cursor<&[u8]>, n: u64| -> Result<()> {
        let end = r.position().saturating_add(n);
        if end > r.get_ref().len() as u64 {
            bail!("truncated pickle")
        }
        r.set_position(end);
        Ok(())
    };
    let u32le = |r: &mut Cursor<&[u8]>| -> Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).context("truncated pickle")?;
        Ok(u32::from_le_bytes(b))
    };
    let mut cursor = Cursor::new(pickle);
    let r = &mut cursor;
    let pop = |stack: &mut Vec<Option<Entry>>| -> Result<Entry> {
        stack
            .pop()
            .flatten()
            .context("malformed pickle (stack underflow)")
    };
    let pop_mark = |stack: &mut Vec<Option<Entry>>| -> Result<Vec<Option<Entry>>> {
        let at = stack
            .iter()
            .rposition(Option::is_none)
            .context("malformed pickle (no MARK)")?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = byte(r)?;
        let pushed = match op {
            0x80 => {
                skip(r, 1)?;
                continue;
            }
            b'c' => {
                for _ in 0..2 {
                    let rest = &r.get_ref()[r.position() as usize..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .context("truncated pickle")?;
                    skip(r, n as u64 + 1)?;
                }
                LEAF
            }
            b'q' | b'r' => {
                let id = if op == b'q' {
                    byte(r)? as u32
                } else {
                    u32le(r)?
                };
                let top = stack
                    .last()
                    .copied()
                    .flatten()
                    .context("malformed pickle (memo put on an empty stack)")?;
                built = built.saturating_add(top.nodes);
                memo.insert(id, top);
                continue;
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    byte(r)? as u32
                } else {
                    u32le(r)?
                };
                let e = *memo
                    .get(&id)
                    .context("malformed pickle (memo get of a missing entry)")?;
                built = built.saturating_add(e.nodes);
                e
            }
            b')' | b'}' | b']' | b'N' | 0x88 | 0x89 | b'd' => LEAF,
            b'(' => {
                stack.push(None);
                continue;
            }
            b'X' => {
                let n = u32le(r)?;
                skip(r, n as u64)?;
                LEAF
            }
            b'J' => {
                skip(r, 4)?;
                LEAF
            }
            b'K' => {
                skip(r, 1)?;
                LEAF
            }
            b'M' => {
                skip(r, 2)?;
                LEAF
            }
            b'G' => {
                skip(r, 8)?;
                LEAF
            }
            0x8a => {
                let n = byte(r)?;
                if n > 8 {
                    bail!("integer of {n} bytes is not supported")
                }
                skip(r, n as u64)?;
                LEAF
            }
            b't' => join(&pop_mark(&mut stack)?),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let items = (0..n)
                    .map(|_| pop(&mut stack).map(Some))
                    .collect::<Result<Vec<_>>>()?;
                join(&items)
            }
            b'Q' => join(&[Some(pop(&mut stack)?)]),
            b'R' | 0x81 | b'b' => {
                let a = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                join(&[Some(a), Some(b)])
            }
            b's' | b'a' => {
                let v = pop(&mut stack)?;
                let mut items = vec![Some(v)];
                if op == b's' {
                    items.push(Some(pop(&mut stack)?));
                }
                items.push(Some(pop(&mut stack)?));
                join(&items)
            }
            b'u' | b'e' => {
                let mut items = pop_mark(&mut stack)?;
                items.push(Some(pop(&mut stack)?));
                join(&items)
            }
            b'.' => return Ok(()),
            other => bail!("pickle opcode 0x{other:02x} is not one torch.save uses"),
        };
        if pushed.depth > MAX_DEPTH || built.saturating_add(pushed.nodes) > MAX_NODES {
            bail!("the pickle describes an object tree too large or too deeply nested for an embedding file")
        }
        built = built.saturating_add(1);
        stack.push(Some(pushed));
    }
}

fn refuse(what: &str) -> anyhow::Error {
    anyhow!(
        "refusing to load: the pickle uses {what}, which is not a tensor or plain data \
         (pickled files can run code when loaded with Python; imprint reads only tensors, numbers, \
         strings, lists and dicts, and never runs anything)"
    )
}

fn class_name(o: &Object) -> Option<(&str, &str)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => Some((module_name.as_str(), class_name.as_str())),
        _ => None,
    }
}

fn tuple_items(o: Object, what: &str) -> Result<Vec<Object>> {
    match o {
        Object::Tuple(items) => Ok(items),
        other => bail!("malformed {what}: expected a tuple, got {other:?}"),
    }
}

/// Converts candle's inert object tree, allowing only data and tensor reconstruction.
fn to_value(o: Object, ar: &mut Archive, depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        bail!("the pickle nests deeper than {MAX_DEPTH} levels")
    }
    let d = depth + 1;
    Ok(match o {
        Object::None => Value::None,
        Object::Bool(b) => Value::Bool(b),
        Object::Int(i) => Value::Int(i as i64),
        Object::Long(i) => Value::Int(i),
        Object::Float(f) => Value::Float(f),
        Object::Unicode(s) => Value::Str(s),
        Object::List(items) => Value::List(
            items
                .into_iter()
                .map(|x| to_value(x, ar, d))
                .collect::<Result<_>>()?,
        ),
        Object::Tuple(items) => Value::Tuple(
            items
                .into_iter()
                .map(|x| to_value(x, ar, d))
                .collect::<Result<_>>()?,
        ),
        Object::Dict(items) => Value::Dict(
            items
                .into_iter()
                .map(|(k, v)| Ok((to_value(k, ar, d)?, to_value(v, ar, d)?)))
                .collect::<Result<_>>()?,
        ),
        Object::Reduce { callable, args } => reduce(*callable, *args, ar, d)?,
        Object::Build { callable, args } => build(*callable, *args, ar, d)?,
        Object::Class {
            module_name,
            class_name,
        } => {
            return Err(refuse(&format!(
                "the Python object {module_name}.{class_name}"
            )))
        }
        Object::PersistentLoad(_) => bail!("malformed pickle: a storage outside a tensor"),
        Object::Mark => bail!("malformed pickle: a stray MARK"),
    })
}

/// A recorded call `callable(*args)`: only tensor rebuilding is allowed.
fn reduce(callable: Object, args: Object, ar: &mut Archive, d: usize) -> Result<Value> {
    let Some((module, name)) = class_name(&callable) else {
        bail!("malformed pickle: a call of a non-class {callable:?}")
    };
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Value::Tensor(rebuild_tensor(args, ar)?)),
        // nn.Parameter: (tensor, requires_grad, backward_hooks[, state]).
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => {
            let mut items = tuple_items(args, "parameter")?;
            if items.is_empty() {
                bail!("malformed parameter: no tensor")
            }
            match to_value(items.swap_remove(0), ar, d)? {
                t @ Value::Tensor(_) => Ok(t),
                other => bail!("malformed parameter: holds a {}", other.kind()),
            }
        }
        // Tensor subclasses: (rebuild function, type, its arguments, state).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let mut items = tuple_items(args, "tensor subclass")?;
            if items.len() < 3 {
                bail!("malformed tensor subclass")
            }
            let inner_args = items.swap_remove(2);
            let func = items.swap_remove(0);
            match reduce(func, inner_args, ar, d)? {
                t @ Value::Tensor(_) => Ok(t),
                other => bail!("malformed tensor subclass: holds a {}", other.kind()),
            }
        }
        // candle turns OrderedDict() into an empty dict itself; with arguments it is refused.
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        _ => Err(refuse(&format!("a call of {module}.{name}"))),
    }
}

/// `obj.__setstate__(state)`: allowed only for the `torch.nn.ParameterDict` that the original
/// textual-inversion code (and so old A1111 embeddings) saved as `string_to_param`. Only the
/// `_parameters` entry of its state is read; the module's other state (hooks, sets, ...) is never
/// interpreted.
fn build(obj: Object, state: Object, ar: &mut Archive, d: usize) -> Result<Value> {
    if let Object::Reduce { callable, args } = &obj {
        // Protocol 2 pickles an object as `cls.__new__(cls)` (NEWOBJ, which candle records as a
        // call of the class); older code goes through `copyreg._reconstructor(cls, object, None)`.
        let cls = match class_name(callable) {
            Some(("copyreg", "_reconstructor")) => match args.as_ref() {
                Object::Tuple(items) => items.first().and_then(class_name),
                _ => None,
            },
            other => other,
        };
        match cls {
            Some(("torch.nn.modules.container", "ParameterDict")) => {
                let Object::Dict(items) = state else {
                    bail!("malformed ParameterDict: its state is not a dict")
                };
                let params = items
                    .into_iter()
                    .find(|(k, _)| matches!(k, Object::Unicode(k) if k == "_parameters"))
                    .map(|(_, v)| v)
                    .context("malformed ParameterDict: no _parameters")?;
                return to_value(params, ar, d);
            }
            Some((m, n)) => return Err(refuse(&format!("the Python object {m}.{n}"))),
            None => {}
        }
    }
    // A tensor given extra state: the tensor itself is what we keep.
    match to_value(obj, ar, d)? {
        t @ Value::Tensor(_) => Ok(t),
        other => bail!("malformed pickle: state set on a {}", other.kind()),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, ...)`
/// where storage is the persistent id `("storage", <dtype>Storage, key, location, numel)`.
fn rebuild_tensor(args: Object, ar: &mut Archive) -> Result<Tensor> {
    let items = tuple_items(args, "tensor")?;
    if items.len() < 4 {
        bail!("malformed tensor: {} arguments", items.len())
    }
    let mut items = items.into_iter();
    let storage = match items.next() {
        Some(Object::PersistentLoad(id)) => tuple_items(*id, "storage id")?,
        other => bail!("malformed tensor: storage {other:?}"),
    };
    let int = |o: Option<Object>, what: &str| -> Result<i64> {
        match o {
            Some(Object::Int(i)) => Ok(i as i64),
            Some(Object::Long(i)) => Ok(i),
            other => bail!("malformed tensor: {what} {other:?}"),
        }
    };
    let ints = |o: Option<Object>, what: &str| -> Result<Vec<usize>> {
        match o {
            Some(Object::Tuple(xs)) => xs
                .into_iter()
                .map(|x| match x {
                    Object::Int(i) if i >= 0 => Ok(i as usize),
                    Object::Long(i) if i >= 0 => Ok(i as usize),
                    other => bail!("malformed tensor: {what} entry {other:?}"),
                })
                .collect(),
            other => bail!("malformed tensor: {what} {other:?}"),
        }
    };
    let offset = int(items.next(), "storage offset")?;
    let size = ints(items.next(), "size")?;
    let stride = ints(items.next(), "stride")?;
    if offset < 0 || size.len() != stride.len() {
        bail!("malformed tensor: offset {offset}, size {size:?}, stride {stride:?}")
    }

    let mut storage = storage.into_iter();
    match storage.next() {
        Some(Object::Unicode(s)) if s == "storage" => {}
        other => bail!("malformed storage id {other:?}"),
    }
    let dtype = match storage.next().as_ref().and_then(class_name) {
        Some(("torch", "FloatStorage")) => DType::F32,
        Some(("torch", "HalfStorage")) => DType::F16,
        Some(("torch", "BFloat16Storage")) => DType::BF16,
        Some(("torch", "DoubleStorage")) => DType::F64,
        Some((m, n)) => {
            bail!("tensors stored as {m}.{n} are not supported (expected floating point)")
        }
        None => bail!("malformed storage id: no storage type"),
    };
    let key = match storage.next() {
        Some(Object::Unicode(k)) if !k.contains('/') && !k.contains("..") => k,
        other => bail!("malformed storage key {other:?}"),
    };

    let elem = dtype.size_in_bytes();
    let bytes = ar.storage(&key)?;
    let numel = bytes.len() / elem;
    let count: usize = size.iter().product();
    // The furthest element the view touches must lie inside the storage.
    let last = offset as usize
        + size
            .iter()
            .zip(&stride)
            .map(|(&n, &s)| n.saturating_sub(1) * s)
            .sum::<usize>();
    if count > 0 && last >= numel {
        bail!("malformed tensor: view {size:?} (stride {stride:?}, offset {offset}) exceeds its storage of {numel} elements")
    }
    let whole = Tensor::from_raw_buffer(&bytes[..numel * elem], dtype, &[numel], &Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    // Gather the (possibly strided) view in row-major order.
    let mut data = Vec::with_capacity(count);
    let mut index = vec![0usize; size.len()];
    for _ in 0..count {
        let at = offset as usize + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        data.push(whole[at]);
        for axis in (0..size.len()).rev() {
            index[axis] += 1;
            if index[axis] < size[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(Tensor::from_vec(data, size, &Device::Cpu)?)
}
