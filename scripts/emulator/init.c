/* PID 1 of the emulated machine that scripts/emulated-tests.sh boots: runs
 * every program in /tests (one test thread each, showing what passing tests print), reports each exit status on
 * the serial console, and powers the machine off. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

int main(void) {
  mount("proc", "/proc", "proc", 0, 0);
  mount("sysfs", "/sys", "sysfs", 0, 0);
  int failed = 0, ran = 0;
  struct dirent **names;
  int n = scandir("/tests", &names, NULL, alphasort);
  for (int i = 0; i < n; i++) {
    if (names[i]->d_name[0] == '.') continue;
    char path[512];
    snprintf(path, sizeof path, "/tests/%s", names[i]->d_name);
    printf("EMULATED: running %s\n", path);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
      char *argv[] = {path, "--test-threads=1", "--show-output", NULL};
      execv(path, argv);
      perror("exec");
      _exit(127);
    }
    int status = 0;
    waitpid(child, &status, 0);
    ran++;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("EMULATED: %s exit %d\n", path, code);
    fflush(stdout);
    if (code != 0) failed++;
  }
  printf("EMULATED: done, %d ran, %d failed\n", ran, failed);
  fflush(stdout);
  /* The console is an emulated serial line: let it send what is queued
     before the power goes, or the last lines are lost. */
  tcdrain(STDOUT_FILENO);
  sleep(1);
  sync();
  reboot(RB_POWER_OFF);
  return 0;
}
