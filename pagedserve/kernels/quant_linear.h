// Linear layers that read GGUF Q4_1 weights directly (see quant_linear.cpp).
#pragma once
#include <torch/extension.h>

#include <vector>

// Raw Q4_1 rows [N, K/32*20] (uint8, llama.cpp's block layout) -> {qs, d, m} in the panel layout
// that q4_1_linear reads: 32 output features per panel.
std::vector<torch::Tensor> q4_1_pack(torch::Tensor raw, int64_t in_features);

// x [M, K] float32 @ dequant(W)^T -> [M, N]; the weights equal gguf's own dequantization bit for bit.
torch::Tensor q4_1_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m);

// Whether q4_1_linear was compiled with its AVX-512 kernel (otherwise a slow portable loop).
bool q4_1_simd();
