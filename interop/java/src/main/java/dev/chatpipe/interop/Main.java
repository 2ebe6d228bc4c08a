package dev.chatpipe.interop;

import java.util.Arrays;

/** {@code java -jar chatpipe-interop.jar produce|consume ARGS...}. */
public final class Main {

    private Main() {}

    public static void main(String[] argv) throws Exception {
        if (argv.length == 0) {
            System.err.println("usage: chatpipe-interop produce|consume ARGS... (see ChatProducer, ResponseConsumer)");
            System.exit(2);
        }
        String[] rest = Arrays.copyOfRange(argv, 1, argv.length);
        switch (argv[0]) {
            case "produce" -> ChatProducer.main(rest);
            case "consume" -> ResponseConsumer.main(rest);
            default -> {
                System.err.println("unknown command " + argv[0] + ": produce or consume");
                System.exit(2);
            }
        }
    }
}
