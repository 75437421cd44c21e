/* A stand-in libnvidia-ml.so.1 for tests: the few NVML entry points spotguard.gpu calls, with the
 * documented C signatures, answering from environment variables so each test can pick the values:
 *   FAKE_NVML_COUNT (GPUs, default 1), FAKE_NVML_NAME, FAKE_NVML_DRIVER,
 *   FAKE_NVML_MEM_TOTAL / FAKE_NVML_MEM_USED (bytes; GPU i uses USED + i),
 *   FAKE_NVML_INIT_ERROR / FAKE_NVML_MEMORY_ERROR (an nvmlReturn_t to fail with, e.g. 15 = GPU lost),
 *   FAKE_NVML_INIT_DELAY_MS (a driver that hangs in init). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef void *nvmlDevice_t;

static unsigned long long env_num(const char *name, unsigned long long fallback) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : fallback;
}
static int copy_out(const char *text, char *buf, unsigned int len) {
    if (strlen(text) + 1 > len) return 7; /* NVML_ERROR_INSUFFICIENT_SIZE */
    strcpy(buf, text);
    return 0;
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    unsigned long long ms = env_num("FAKE_NVML_INIT_DELAY_MS", 0);
    struct timespec delay = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    if (ms) nanosleep(&delay, NULL);
    return (int)env_num("FAKE_NVML_INIT_ERROR", 0);
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int result) { return result == 15 ? "GPU is lost" : "Fake NVML error"; }
int nvmlSystemGetDriverVersion(char *buf, unsigned int len) {
    const char *v = getenv("FAKE_NVML_DRIVER");
    return copy_out(v ? v : "550.54.15", buf, len);
}
int nvmlDeviceGetCount_v2(unsigned int *count) { *count = (unsigned int)env_num("FAKE_NVML_COUNT", 1); return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= env_num("FAKE_NVML_COUNT", 1)) return 2; /* NVML_ERROR_INVALID_ARGUMENT */
    *device = (nvmlDevice_t)(unsigned long)(index + 1); /* opaque to callers; index + 1 avoids NULL */
    return 0;
}
int nvmlDeviceGetName(nvmlDevice_t device, char *buf, unsigned int len) {
    (void)device;
    const char *v = getenv("FAKE_NVML_NAME");
    return copy_out(v ? v : "NVIDIA H100 80GB HBM3", buf, len);
}
int nvmlDeviceGetUUID(nvmlDevice_t device, char *buf, unsigned int len) {
    char text[64];
    snprintf(text, sizeof text, "GPU-fake0000-0000-0000-0000-%012lu", (unsigned long)device - 1);
    return copy_out(text, buf, len);
}
int nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    int err = (int)env_num("FAKE_NVML_MEMORY_ERROR", 0);
    if (err) return err;
    memory->total = env_num("FAKE_NVML_MEM_TOTAL", 85899345920ULL);
    memory->used = env_num("FAKE_NVML_MEM_USED", 1073741824ULL) + ((unsigned long)device - 1);
    memory->free = memory->total - memory->used;
    return 0;
}
