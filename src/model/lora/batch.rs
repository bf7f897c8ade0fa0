//! Which rows of a stacked batch use which adapter. The base projection runs once over every
//! row; each adapter's low-rank delta runs over its own rows only (gathered, multiplied and
//! added back in place), so a batch of several adapters costs one base matmul plus, per
//! adapter, two matmuls of rank width.

use candle_core::{Device, Result, Tensor};

use super::Adapter;

pub struct LoraBatch<'a> {
    groups: Vec<Group<'a>>,
}

struct Group<'a> {
    adapter: &'a Adapter,
    /// The rows it applies to (`u32`), or `None` for every row of the batch.
    rows: Option<Tensor>,
}

impl<'a> LoraBatch<'a> {
    /// `row_adapters[i]`: the adapter of row `i`, if any (none at all: an empty batch).
    pub fn new(row_adapters: &[Option<&'a Adapter>], device: &Device) -> Result<Self> {
        let mut groups: Vec<(&Adapter, Vec<u32>)> = Vec::new();
        for (row, adapter) in row_adapters.iter().enumerate() {
            let Some(adapter) = adapter else { continue };
            match groups.iter_mut().find(|(a, _)| a.id() == adapter.id()) {
                Some((_, rows)) => rows.push(row as u32),
                None => groups.push((adapter, vec![row as u32])),
            }
        }
        let groups = (groups.into_iter())
            .map(|(adapter, rows)| {
                let rows = if rows.len() == row_adapters.len() {
                    None
                } else {
                    Some(Tensor::new(rows, device)?)
                };
                Ok(Group { adapter, rows })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    /// Whether any of the batch's adapters changes slot `slot`.
    pub fn touches(&self, slot: usize) -> bool {
        (self.groups.iter()).any(|g| matches!(g.adapter.slots.get(slot), Some(Some(_))))
    }

    /// `ys` (slot `slot`'s base output for inputs `xs`, both `[rows, _]`) with each row's
    /// adapter delta added.
    pub fn apply(&self, slot: usize, xs: &Tensor, ys: Tensor) -> Result<Tensor> {
        let mut ys = ys;
        for group in &self.groups {
            ys = match &group.rows {
                None => match group.adapter.delta(slot, xs)? {
                    Some(delta) => (ys + delta)?,
                    None => ys,
                },
                Some(rows) => match group.adapter.delta(slot, &xs.index_select(rows, 0)?)? {
                    Some(delta) => ys.index_add(rows, &delta, 0)?,
                    None => ys,
                },
            };
        }
        Ok(ys)
    }
}
