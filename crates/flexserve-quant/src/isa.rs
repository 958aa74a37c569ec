//! The instruction-set tiers the kernels come in, which of them this CPU
//! runs, and the process-wide cap on the tier the default tables use.

/// Which implementation the kernel tables use. Tiers of one architecture
/// are ordered from the most portable up (each tier's CPUs also run every
/// lower one); `Portable` is below every tier; tiers of different
/// architectures do not compare (`Isa::Neon >= Isa::Avx2` is false, and so
/// is `Isa::Neon <= Isa::Avx2`), so `PartialOrd` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// `Avx2` plus AVX-512 F, BW, VL and VNNI. Kernels written for it where it
    /// pays (the rearranged Q4_0/Q8_0 products); the rest use the AVX2 ones.
    Avx512,
    /// aarch64 with NEON (Advanced SIMD, part of every aarch64 Linux CPU);
    /// integer products by widening multiplies.
    Neon,
    /// `Neon` plus the dot-product instructions (`sdot`, Armv8.2's
    /// `dotprod`, e.g. Cortex-A55/A76).
    NeonDot,
}

/// Every tier, portable first, each architecture's from the lowest up.
const ALL_ISAS: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::NeonDot];

impl PartialOrd for Isa {
    fn partial_cmp(&self, other: &Isa) -> Option<std::cmp::Ordering> {
        let ((arch_a, rank_a), (arch_b, rank_b)) = (self.place(), other.place());
        (rank_a == 0 || rank_b == 0 || arch_a == arch_b).then(|| rank_a.cmp(&rank_b))
    }
}

impl Isa {
    /// Lower-case name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dot",
        }
    }

    /// The tier named `name` (as `name` prints it).
    pub fn from_name(name: &str) -> Option<Isa> {
        ALL_ISAS.into_iter().find(|isa| isa.name() == name)
    }

    /// The architecture family (0 for portable, 1 x86-64, 2 aarch64) and
    /// the rank within it (0 for portable).
    fn place(self) -> (u8, u8) {
        match self {
            Isa::Portable => (0, 0),
            Isa::Avx2 => (1, 1),
            Isa::Avx512 => (1, 2),
            Isa::Neon => (2, 1),
            Isa::NeonDot => (2, 2),
        }
    }

    /// `self`, lowered to the best tier this CPU runs: tests and benchmarks
    /// ask for a tier, and a CPU without it gets the best one it has below
    /// it. A tier of another architecture has only `Portable` below it: an
    /// aarch64 CPU asked for `Avx2` gets `Portable`, never an x86 tier.
    pub fn usable(self) -> Isa {
        let best = detected_isa();
        if self <= best {
            self
        } else if best <= self {
            best
        } else {
            Isa::Portable
        }
    }
}

/// The best instruction set this CPU offers that the kernels use.
pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        if has!("neon") {
            if has!("dotprod") {
                return Isa::NeonDot;
            }
            return Isa::Neon;
        }
    }
    Isa::Portable
}

/// Process-wide cap on the tier the default kernel tables use (`u8::MAX`:
/// none; else an index into `ALL_ISAS`).
static ISA_LIMIT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the tier that `kernel_set`, `kernels`, `tile_kernel`, `gemv_kernel`,
/// `activations`, `f16_acc`, `read_kernel` and `Repacked::kernel` pick from
/// now on, for the whole process, so that one CPU can compare its tiers
/// (`flexserve bench engine --isa avx2`).
/// Call it before a model is loaded: tables looked up earlier (a loaded
/// tensor's `KernelSet`) keep their tier.
/// Returns the tier in effect (`limit.usable()`), which is lower than `limit`
/// on a CPU without it, and `Portable` for another architecture's tier.
/// `limit_isa(detected_isa())` lifts the cap.
pub fn limit_isa(limit: Isa) -> Isa {
    let index = ALL_ISAS.iter().position(|&isa| isa == limit).expect("every tier is listed");
    ISA_LIMIT.store(index as u8, std::sync::atomic::Ordering::Relaxed);
    active_isa()
}

/// The tier the default kernel tables use: the CPU's best, unless `limit_isa`
/// capped it.
pub fn active_isa() -> Isa {
    match ALL_ISAS.get(ISA_LIMIT.load(std::sync::atomic::Ordering::Relaxed) as usize) {
        Some(limit) => limit.usable(),
        None => detected_isa(),
    }
}

/// Every tier this CPU runs, portable first (what tests compare).
pub fn usable_isas() -> Vec<Isa> {
    ALL_ISAS.into_iter().filter(|&isa| isa.usable() == isa).collect()
}
