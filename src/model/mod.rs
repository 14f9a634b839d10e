//! Model runtime (owned by the model helper).
