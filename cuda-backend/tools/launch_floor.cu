// The CUDA driver's own launch floor, without kvferry: what each call of a launch costs on the
// host, and how soon an empty kernel's completion can be seen. Quoted in BENCHMARKS.md
// ("Per-request cost", the floor). Build and run on a GPU machine:
//   nvcc -O2 -o launch_floor launch_floor.cu -lcuda && ./launch_floor
#include <cuda.h>
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
#define CK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { const char* s; cuGetErrorString(r, &s); printf("%s: %s\n", #x, s); return 1; } } while (0)
using clk = std::chrono::steady_clock;
static double us(clk::time_point a, clk::time_point b) { return std::chrono::duration<double, std::micro>(b - a).count(); }
static double med(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }
const char* ptx = R"(
.version 7.0
.target sm_80
.address_size 64
.visible .entry empty(.param .u64 p) { ret; }
)";
int main() {
  CK(cuInit(0)); CUdevice dev; CK(cuDeviceGet(&dev, 0)); CUcontext ctx; CK(cuDevicePrimaryCtxRetain(&ctx, dev)); CK(cuCtxSetCurrent(ctx));
  CUmodule mod; CK(cuModuleLoadData(&mod, ptx)); CUfunction f; CK(cuModuleGetFunction(&f, mod, "empty"));
  CUstream s; CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
  size_t n = 16 << 10; void* host; CK(cuMemHostAlloc(&host, n, 0)); CUdeviceptr d; CK(cuMemAlloc(&d, n));
  unsigned flags = CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC;
  const int N = 2000;
  std::vector<double> create, destroy, upload, launch, record, query, e2e_up, e2e_pool;
  CUevent pooled; CK(cuEventCreate(&pooled, flags));
  for (int i = 0; i < N; i++) {
    unsigned long long arg = d; void* params[] = { &arg };
    auto t0 = clk::now(); CUevent e; CK(cuEventCreate(&e, flags));
    auto t1 = clk::now(); CK(cuMemcpyHtoDAsync(d, host, n, s));
    auto t2 = clk::now(); CK(cuLaunchKernel(f, 132 * 8, 1, 1, 256, 1, 1, 0, s, params, nullptr));
    auto t3 = clk::now(); CK(cuEventRecord(e, s));
    auto t4 = clk::now();
    auto tq = clk::now(); CUresult q = cuEventQuery(e); auto tq2 = clk::now();
    while (cuEventQuery(e) == CUDA_ERROR_NOT_READY) {}
    auto t5 = clk::now(); CK(cuEventDestroy(e)); auto t6 = clk::now();
    create.push_back(us(t0, t1)); upload.push_back(us(t1, t2)); launch.push_back(us(t2, t3)); record.push_back(us(t3, t4));
    if (q == CUDA_ERROR_NOT_READY) query.push_back(us(tq, tq2));
    e2e_up.push_back(us(t0, t5)); destroy.push_back(us(t5, t6));
    // Without the upload, with a reused event: launch, record, spin.
    auto u0 = clk::now(); CK(cuLaunchKernel(f, 132 * 8, 1, 1, 256, 1, 1, 0, s, params, nullptr)); CK(cuEventRecord(pooled, s));
    while (cuEventQuery(pooled) == CUDA_ERROR_NOT_READY) {}
    e2e_pool.push_back(us(u0, clk::now()));
  }
  printf("median us over %d: cuEventCreate(blocking) %.2f, cuMemcpyHtoDAsync 16KiB %.2f, cuLaunchKernel %.2f, cuEventRecord %.2f, cuEventQuery (not ready, %zu of them) %.2f, cuEventDestroy %.2f\n",
    N, med(create), med(upload), med(launch), med(record), query.size(), query.empty() ? 0.0 : med(query), med(destroy));
  printf("submit to completion seen, empty kernel: with create+upload %.2f us; launch+record+spin with a reused event, no upload %.2f us\n", med(e2e_up), med(e2e_pool));
  return 0;
}
