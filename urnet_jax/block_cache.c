/* A cache of large blocks, loaded with LD_PRELOAD (urnet_jax.host_memory builds and loads it).
 *
 * XLA's CPU runtime allocates each execution's temporary buffer (about 1 GB for a train step of UR-Net(32) +
 * ResNet18 at 128 px, batch 16; posix_memalign, or malloc padded to align it itself) when the execution
 * starts and frees it when it ends. glibc maps so large a block afresh and unmaps it on free, so every step
 * faults the whole buffer in again, in 4 KiB pages. This library serves requests (malloc, posix_memalign,
 * aligned_alloc, memalign) of at least $URNET_JAX_BLOCK_CACHE_MIN_MB MiB (default 16) from page-aligned
 * anonymous mappings of its own and keeps a freed block for the next request of the same size (rounded up to
 * whole pages). It holds at most $URNET_JAX_BLOCK_CACHE_IDLE_MB MiB (default: a quarter of the machine's
 * memory) of blocks that nothing uses, unmapping idle blocks beyond that (other sizes first), and unmaps a
 * block left idle for $URNET_JAX_BLOCK_CACHE_STALE_MS milliseconds (default 30000) at the next request or
 * free of a block. Every other request, and every block it cannot place (64 at most), goes to glibc.
 * urnet_block_cache_stats() reports its counters.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 64
#define PAGE 4096u

typedef struct {
  void *address; /* NULL: the slot is empty */
  size_t size;   /* bytes, a whole number of pages */
  int in_use;
  uint64_t last_used_ns; /* CLOCK_MONOTONIC when it was last taken or freed */
} Block;

static Block blocks[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t min_bytes = SIZE_MAX;
static size_t idle_limit;
static uint64_t stale_ns = 30000ull * 1000000ull;
static uint64_t reuses, maps, unmaps, in_use_bytes, idle_bytes, peak_held_bytes;

/* glibc's own allocator under its exported names, so no lookup is needed before the first call. */
extern void *__libc_malloc(size_t size);
extern void __libc_free(void *address);
extern void *__libc_realloc(void *address, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);
static size_t (*libc_malloc_usable_size)(void *);

static size_t megabytes_from_env(const char *name, size_t fallback) {
  const char *text = getenv(name);
  if (text == NULL || *text == '\0') return fallback;
  char *end;
  unsigned long long value = strtoull(text, &end, 10);
  return *end == '\0' ? (size_t)value << 20 : fallback;
}

static void lock_before_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }

/* Until this has run, every request goes to glibc (min_bytes is SIZE_MAX). */
__attribute__((constructor)) static void configure(void) {
  long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
  size_t quarter = pages > 0 && page_size > 0 ? (size_t)pages * (size_t)page_size / 4 : (size_t)1 << 30;
  idle_limit = megabytes_from_env("URNET_JAX_BLOCK_CACHE_IDLE_MB", quarter);
  const char *stale_ms = getenv("URNET_JAX_BLOCK_CACHE_STALE_MS");
  if (stale_ms != NULL && *stale_ms != '\0') stale_ns = strtoull(stale_ms, NULL, 10) * 1000000ull;
  pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
  __atomic_store_n(&min_bytes, megabytes_from_env("URNET_JAX_BLOCK_CACHE_MIN_MB", (size_t)16 << 20),
                   __ATOMIC_RELEASE);
}

static uint64_t now_ns(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

/* Unmaps idle blocks unused since `now` - stale_ns, then others (other sizes than `keep` first, then
 * `keep`'s) until `extra` more idle bytes fit the limit. Called with the lock held. */
static void unmap_idle(size_t extra, size_t keep, uint64_t now) {
  for (int pass = 0; pass < 3; pass++)
    for (int i = 0; i < SLOTS; i++) {
      Block *block = &blocks[i];
      if (block->address == NULL || block->in_use) continue;
      int stale = now - block->last_used_ns > stale_ns;
      if (pass == 0 ? !stale : (idle_bytes + extra <= idle_limit || (pass == 1 && block->size == keep))) continue;
      munmap(block->address, block->size);
      idle_bytes -= block->size;
      unmaps++;
      block->address = NULL;
    }
}

static void note_held(void) {
  if (in_use_bytes + idle_bytes > peak_held_bytes) peak_held_bytes = in_use_bytes + idle_bytes;
}

/* A block of at least `size` bytes from the cache or a new mapping; NULL where it cannot place one. */
static void *take(size_t size) {
  size = (size + PAGE - 1) & ~(size_t)(PAGE - 1);
  uint64_t now = now_ns();
  pthread_mutex_lock(&lock);
  for (int i = 0; i < SLOTS; i++) {
    Block *block = &blocks[i];
    if (block->address != NULL && !block->in_use && block->size == size) {
      block->in_use = 1;
      block->last_used_ns = now;
      idle_bytes -= size;
      in_use_bytes += size;
      reuses++;
      pthread_mutex_unlock(&lock);
      return block->address;
    }
  }
  unmap_idle(size, 0, now);  /* a new block: make room for it to become idle later */
  Block *slot = NULL;
  for (int i = 0; i < SLOTS && slot == NULL; i++)
    if (blocks[i].address == NULL) slot = &blocks[i];
  void *address = slot == NULL ? MAP_FAILED
      : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (address == MAP_FAILED) {
    pthread_mutex_unlock(&lock);
    return NULL;
  }
  *slot = (Block){address, size, 1, now};
  in_use_bytes += size;
  maps++;
  note_held();
  pthread_mutex_unlock(&lock);
  return address;
}

/* The slot of an in-use block of ours starting at `address`, or NULL. Called with the lock held. */
static Block *find(const void *address) {
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].address == address && blocks[i].in_use) return &blocks[i];
  return NULL;
}

static int maybe_ours(const void *address) {
  return address != NULL && ((uintptr_t)address & (PAGE - 1)) == 0;
}

/* The size of our block at `address`, 0 where it is not ours. */
static size_t size_of(const void *address) {
  if (!maybe_ours(address)) return 0;
  pthread_mutex_lock(&lock);
  Block *block = find(address);
  size_t size = block == NULL ? 0 : block->size;
  pthread_mutex_unlock(&lock);
  return size;
}

static int wanted(size_t size, size_t alignment) {
  return size >= __atomic_load_n(&min_bytes, __ATOMIC_ACQUIRE) && alignment <= PAGE;
}

void free(void *address) {
  if (maybe_ours(address)) {
    pthread_mutex_lock(&lock);
    Block *block = find(address);
    if (block != NULL) {
      in_use_bytes -= block->size;
      block->last_used_ns = now_ns();
      unmap_idle(block->size, block->size, block->last_used_ns);  /* before it is marked idle: it stays */
      block->in_use = 0;
      if (idle_bytes + block->size > idle_limit) {
        munmap(block->address, block->size);
        unmaps++;
        block->address = NULL;
      } else {
        idle_bytes += block->size;
      }
      pthread_mutex_unlock(&lock);
      return;
    }
    pthread_mutex_unlock(&lock);
  }
  __libc_free(address);
}

void *malloc(size_t size) {
  void *address = wanted(size, 0) ? take(size) : NULL;
  return address != NULL ? address : __libc_malloc(size);
}

void *memalign(size_t alignment, size_t size) {
  void *address = wanted(size, alignment) ? take(size) : NULL;
  return address != NULL ? address : __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) {
  return memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment % sizeof(void *) != 0) return EINVAL;
  void *address = memalign(alignment, size);
  if (address == NULL && size != 0) return ENOMEM;
  *out = address;
  return 0;
}

size_t malloc_usable_size(void *address) {
  size_t size = size_of(address);
  if (size != 0) return size;
  if (libc_malloc_usable_size == NULL)
    libc_malloc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return libc_malloc_usable_size(address);
}

void *realloc(void *address, size_t size) {
  size_t old_size = size_of(address);
  if (old_size == 0) return __libc_realloc(address, size);
  void *moved = malloc(size);
  if (moved == NULL) return NULL;
  memcpy(moved, address, old_size < size ? old_size : size);
  free(address);
  return moved;
}

/* Counters since the process started: reuses, new mappings, unmapped idle blocks, bytes in use, idle
 * bytes, the peak of in-use + idle bytes, and the two limits (bytes). */
void urnet_block_cache_stats(uint64_t out[8]) {
  pthread_mutex_lock(&lock);
  uint64_t values[8] = {reuses, maps, unmaps, in_use_bytes, idle_bytes, peak_held_bytes, min_bytes, idle_limit};
  pthread_mutex_unlock(&lock);
  memcpy(out, values, sizeof values);
}
