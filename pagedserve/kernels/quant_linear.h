// Linear layers on packed weights: GGUF blocks, int8 weights, int8 weights x int8 activations
// (see quant_linear.cpp for the layouts).
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

// Codes [N, K] (uint8 or int8: one code per weight), scales d [N, K/block] (or [N] for I8_ROW) and
// minimums m (layouts with one; else empty) -> {codes, d, m} in the panel layout quant_linear reads.
std::vector<torch::Tensor> pack_panels(torch::Tensor codes, torch::Tensor d, torch::Tensor m, const std::string& layout);

// x [M, K] float32 @ W^T -> [M, N], W expanded from its packed layout exactly as gguf dequantizes.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m,
                           const std::string& layout);

// Float32 weights [N, K] -> the same panels [N/32, K, 32], read by quant_linear with layout "F32".
torch::Tensor f32_pack(torch::Tensor weight);

// int8 weights [N, K] with float32 per-feature scales [N] -> {packed, scales} for w8a8_linear.
std::vector<torch::Tensor> w8a8_pack(torch::Tensor q, torch::Tensor scale);

// Symmetric int8 quantization of float32 rows per block of 32: {codes int8 [M, K], scales float32 [M, K/32]}.
std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x);

// x [M, K] float32, quantized per block of 32 inputs, times the int8 weights in integer arithmetic -> float32 [M, N].
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale);

// The build's SIMD level for the float kernels ("avx512", "avx2", "generic") and for W8A8's integer
// dot products ("avx512_vnni", "avx_vnni", "avx2", "generic").
std::string simd_level();
std::string int_dot_level();

// Adds the functions above to the extension module.
void register_quant_linear(pybind11::module& m);
