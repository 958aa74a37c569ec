use crate::{GgmlType, Isa, Kernels};

pub(crate) fn kernels(_ty: GgmlType, _isa: Isa) -> Option<Kernels> {
    None
}
