// CPU emulation for tests (tests/gpu/emu/cuda_emu.hpp)
#pragma once
#include "../cuda_emu.hpp"
