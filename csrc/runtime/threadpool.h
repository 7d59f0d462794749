// A small fork-aware thread pool for the hot path.
//
// Why our own pool and not OpenMP: torch's wheel carries its own libgomp, and two OpenMP
// runtimes in one process oversubscribe the cores and can hang after fork(). This pool
// is private to gemma_cpp, sized by set_num_threads(), and re-created lazily in a forked
// child (a child inherits the memory of the parent's workers but not the threads).
#pragma once
#include <cstdint>
#include <functional>

namespace gemma {

// Number of threads parallel_for uses (the caller counts as one). Default: hardware cores.
int num_threads();
void set_num_threads(int n);

// Runs fn(begin, end) over contiguous ranges that cover [0, n) once, so a kernel sees
// adjacent i together. The calling thread takes part. The range is cut into parts that the
// threads claim in order as they come free (a worker that has not woken yet does not hold the
// others up); one thread may run several parts. Not reentrant: fn must not call parallel_for.
void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace gemma
