// Host-build stand-in for the CUDA toolkit header of the same name (see ../runtime.h).
#pragma once
#include "../runtime.h"
