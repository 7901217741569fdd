//! The global allocator of every Weir binary (and of the benchmark's bare Pingora): mimalloc,
//! called the way its C API is fastest.
//!
//! The `mimalloc` crate sends every allocation through `mi_malloc_aligned`. In mimalloc v3,
//! when that call's small-block fast path misses (a block over 1 KiB, or a size class whose
//! page has no free block yet), it takes the generic aligned path, which over-allocates any
//! block whose size class is not a power of two, into the next class up; so such a class never
//! gets a page of its own and every allocation of it takes that path (mimalloc issue #889).
//! That was 14 of the 73 allocations of a proxied request and 2,900 of its 67,000
//! instructions (docs/bench/rounds.md, fourteenth round). A plain `mi_malloc` block of 16 bytes
//! or more is aligned to 16 (mimalloc asserts it of every block; `std`'s `System` allocator
//! assumes the same of `malloc`), so only the rare larger alignments need the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// mimalloc's `MI_MAX_ALIGN_SIZE`: the alignment of every block of at least this size.
const MALLOC_ALIGN: usize = 16;

/// mimalloc as a `#[global_allocator]`.
pub struct MiMalloc;

/// Whether a plain (unaligned) call returns a block aligned enough for `align` and `size`.
fn plain_is_aligned(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: each method forwards to the mimalloc call of the same contract; the aligned
// variants are used whenever a plain call does not guarantee `layout.align()`.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls have no preconditions.
        unsafe {
            if plain_is_aligned(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if plain_is_aligned(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract); `mi_free` takes
        // blocks from the plain and the aligned calls alike.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract);
        // `mi_realloc` keeps the plain alignment, `mi_realloc_aligned` a larger one.
        unsafe {
            if plain_is_aligned(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size class up to 64 KiB (sizes under their alignment too, which plain
    /// calls would get wrong) and every alignment up to 4 KiB come back aligned, through each
    /// call, including a realloc across size classes.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_as_asked() {
        let a = MiMalloc;
        for align in (0..13).map(|s| 1usize << s) {
            for size in (1..=4096usize).step_by(7).chain([8192, 16384, 65536]) {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; each block is freed once, with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && p.align_offset(align) == 0,
                        "alloc {size}/{align}"
                    );
                    p.write_bytes(0xa5, size);
                    let bigger = size * 3;
                    let q = a.realloc(p, layout, bigger);
                    assert!(
                        !q.is_null() && q.align_offset(align) == 0,
                        "realloc {size}/{align}"
                    );
                    assert_eq!(q.add(size - 1).read(), 0xa5, "realloc kept the bytes");
                    a.dealloc(q, Layout::from_size_align(bigger, align).expect("layout"));
                    let z = a.alloc_zeroed(layout);
                    assert!(
                        !z.is_null() && z.align_offset(align) == 0,
                        "zalloc {size}/{align}"
                    );
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
