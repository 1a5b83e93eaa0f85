// Kernel launches go through SENSILORA_LAUNCH so that a host build (tests/cuda_emulation/) can run the
// kernels on CPU threads: g++ cannot parse <<<...>>>, and a macro defined before this header wins.
#pragma once

#ifndef SENSILORA_LAUNCH
#define SENSILORA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif
