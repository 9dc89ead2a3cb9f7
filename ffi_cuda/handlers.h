// Every FFI handler the module exports; module.cc turns this list into the registration table.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(W4afp8Combine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(W4afp8Route);
XLA_FFI_DECLARE_HANDLER_SYMBOL(W4afp8GatherQuantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(W4afp8SiluMulQuantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(W4afp8GroupedGemm);
