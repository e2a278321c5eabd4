// Host-build stand-in for the CUDA toolkit header of the same name (see ../fp16.h).
#pragma once
#include "../fp16.h"
