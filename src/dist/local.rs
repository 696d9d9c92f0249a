//! World size 1: every collective is a copy (or nothing).

use tch::Tensor;

use super::Collective;
use crate::Result;

pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "none"
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        shard.copy_(full);
        Ok(())
    }
    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        full.copy_(shard);
        Ok(())
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _v: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max_f64(&self, _v: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
