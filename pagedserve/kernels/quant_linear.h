// Linear layers that read GGUF Q4_1 / Q8_0 weights directly (see quant_linear.cpp).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

// Raw GGUF rows [N, K/32 * block bytes] (uint8, llama.cpp's block layout) of `format` ("Q4_1" or
// "Q8_0") -> {codes, d, m} in the panel layout quant_linear reads (m is empty for Q8_0).
std::vector<torch::Tensor> quant_pack(torch::Tensor raw, int64_t in_features, const std::string& format);

// x [M, K] float32 @ dequant(W)^T -> [M, N]; the weights equal gguf's own dequantization bit for bit.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m,
                           const std::string& format);

// Float32 weights [N, K] -> the same panels [N/32, K, 32], read by quant_linear with format "F32".
torch::Tensor f32_pack(torch::Tensor weight);

// Whether quant_linear was compiled with its AVX-512 kernels (without AVX-512 it only raises).
bool quant_linear_simd();
