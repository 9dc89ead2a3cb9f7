// Every FFI handler the module exports, one per line of ops.def.
#pragma once

#include "xla/ffi/api/api.h"

#define W4AFP8_OP(op) XLA_FFI_DECLARE_HANDLER_SYMBOL(w4afp8_##op);
#include "ops.def"
#undef W4AFP8_OP
