// minigpt CUDA kernel sets: the entry points of each set, chosen by the host
// (attention_cuda.cpp) from MINIGPT_CUDA_KERNELS at every call. No CUDA or torch headers.
//   v2 (default): attention_fwd.cu, attention_bwd.cu (minigpt::attention_forward_cuda, ...)
//   v1:           attention_fwd_v1.cu, attention_bwd_v1.cu, the kernels of the first GPU run,
//                 kept until v2 has run on a GPU (the first-use self-check catches wrong results,
//                 not crashes).
#pragma once

#include "../attention.h"

namespace minigpt {
namespace v1 {
int attention_forward_cuda(const AttentionParams& p, void* stream);
int attention_backward_cuda(const AttentionParams& p, void* stream);
}  // namespace v1
}  // namespace minigpt
