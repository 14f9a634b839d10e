//! Block quantizers (owned by the quant helper).
