/* The pod sandbox's pause process: holds the pod's network namespace and
 * does nothing else. As PID 1 it must handle SIGTERM/SIGINT itself, or the
 * kernel ignores them and `docker stop` has to wait for SIGKILL. */
#include <signal.h>
#include <unistd.h>

static void leave(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    signal(SIGTERM, leave);
    signal(SIGINT, leave);
    for (;;)
        pause();
}
